"""Model registry: every global model version of a job, its hashes, lineage, privacy and metrics; bundle export.

A version is the global model after a round (``round-3``), or a saved checkpoint (``best@round-2``,
``final@round-4``). Each carries the SHA-256 of its canonical tensor bytes (:func:`tensor_sha256`: equal
weights give an equal hash, whichever file holds them) and, for saved files, the SHA-256 of the file;
its parent version, job id, round, algorithm, privacy settings and the epsilon spent so far, and the
validation metrics measured on it. Validation metrics of round ``r`` are measured by the sites on the
model they received, i.e. the version of round ``r - 1`` (or ``initial``), and are attached there.

:func:`export_version` writes a copy of the bundle with the chosen version as ``models/model.pt`` and
its TorchScript ``models/model.ts`` (MONAI's ``ckpt_export``), ``configs/metadata.json`` version bumped
with a changelog entry, and ``models/provenance.json``; the file is checked against its registered hash first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from monai_fl_ext.bundle import load_state  # noqa: F401  (re-exported: the registry's model loader)
from monai_fl_ext.errors import InputError
from monai_fl_ext.governance.audit import jsonable
from monai_fl_ext.io import atomic_output_dir, atomic_write_json, read_json, sha256_file, to_json

REGISTRY_FILE = "registry.json"
INITIAL = "initial"


def tensor_sha256(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's canonical tensor bytes: per name (sorted), the name, dtype, shape and the
    little-endian C-order bytes. Independent of the file format, so a model in memory and its saved file agree.

    Args:
        state: name -> tensor or array (an Opacus ``_module.`` prefix is ignored).

    Returns:
        Hex digest.
    """
    h = hashlib.sha256()
    for name in sorted(state, key=lambda k: k.removeprefix("_module.")):
        value = state[name]
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(value))
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(name.removeprefix("_module.").encode("utf-8") + b"\0")
        h.update(f"{arr.dtype.str}{list(arr.shape)}".encode("ascii") + b"\0")
        h.update(arr.tobytes())
    return h.hexdigest()


class ModelRegistry:
    """The versions of one job's global model, in ``<folder>/registry.json`` (rewritten atomically).

    Args:
        folder: the governance folder (``<server output>/governance``).
        job_id: the job id (kept from an existing registry when empty).
    """

    def __init__(self, folder: str | os.PathLike, job_id: str = "") -> None:
        self.folder = Path(folder)
        self.path = self.folder / REGISTRY_FILE
        self._lock = threading.Lock()
        self.data: dict[str, Any] = read_json(self.path) if self.path.exists() else {"job_id": job_id, "job": {}, "versions": []}
        if job_id and not self.data.get("job_id"):
            self.data["job_id"] = job_id

    @classmethod
    def open(cls, folder: str | os.PathLike) -> ModelRegistry:
        """An existing registry.

        Raises:
            InputError: no ``registry.json`` in ``folder``.
        """
        if not (Path(folder) / REGISTRY_FILE).is_file():
            raise InputError(f"{folder}: no {REGISTRY_FILE} (is this a governance folder of a job?)")
        return cls(folder)

    @property
    def versions(self) -> list[dict[str, Any]]:
        """Every version, in the order registered."""
        return self.data["versions"]

    def set_job(self, **info: Any) -> None:
        """Record job-wide facts (algorithm, privacy settings, secure aggregation, config)."""
        with self._lock:
            self.data["job"].update(jsonable(info))
            self._save()

    def get(self, version_id: str) -> dict[str, Any]:
        """The version named ``version_id``.

        Raises:
            InputError: no such version (the message lists those that exist).
        """
        for v in self.versions:
            if v["version"] == version_id:
                return v
        raise InputError(f"{self.path}: no model version {version_id!r}; versions: {', '.join(v['version'] for v in self.versions) or 'none'}")

    def find(self, weights_sha256: str | None) -> dict[str, Any] | None:
        """The first version with these weights, or None."""
        if not weights_sha256:
            return None
        return next((v for v in self.versions if v.get("weights_sha256") == weights_sha256), None)

    def latest_round_version(self, before_round: int | None = None) -> dict[str, Any] | None:
        """The last ``initial``/``round-N`` version (with ``N < before_round`` if given)."""
        found = None
        for v in self.versions:
            if v["kind"] in ("initial", "round") and (before_round is None or v["round"] is None or v["round"] < before_round):
                found = v
        return found

    def add(self, version_id: str, kind: str, rnd: int | None, parent: str | None, weights_sha256: str | None = None,
            file: str | os.PathLike | None = None, metrics: Mapping[str, Any] | None = None,
            privacy: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Register a version (a re-registration of the same id replaces it).

        Args:
            version_id: e.g. ``round-3``, ``best@round-2``.
            kind: ``initial``, ``round``, ``best``, ``final`` or another checkpoint name.
            rnd: round that produced it (None for the initial model).
            parent: the version it was derived from.
            weights_sha256: :func:`tensor_sha256` of its weights.
            file: saved checkpoint; its file SHA-256 is recorded with the path (relative to the server folder).
            metrics: validation metrics measured on it.
            privacy: privacy spent up to it (``max_epsilon``, per-site epsilon) and settings.
            **extra: more facts (scalars/mappings).

        Returns:
            The version record.

        Raises:
            InputError: ``parent`` is not registered, or ``file`` is missing.
        """
        with self._lock:
            if parent is not None and not any(v["version"] == parent for v in self.versions):
                raise InputError(f"{self.path}: parent version {parent!r} of {version_id!r} is not registered")
            rec: dict[str, Any] = {"version": version_id, "kind": kind, "round": rnd, "parent": parent,
                                   "job_id": self.data.get("job_id", ""), "algorithm": self.data["job"].get("algorithm"),
                                   "weights_sha256": weights_sha256, "metrics": jsonable(dict(metrics or {})),
                                   "privacy": jsonable(dict(privacy or {})), "registered": time.time(), **jsonable(extra)}
            if file is not None:
                file = Path(file)
                if not file.is_file():
                    raise InputError(f"{file}: model file of version {version_id!r} not found")
                rec["file"] = os.path.relpath(file.resolve(), self.folder.resolve().parent)
                rec["file_sha256"] = sha256_file(file)
                rec["file_bytes"] = file.stat().st_size
            twin = self.find(weights_sha256)
            if twin is not None and twin["version"] != version_id:
                rec["same_weights_as"] = twin["version"]
            self.data["versions"] = [v for v in self.versions if v["version"] != version_id] + [rec]
            self._save()
            return rec

    def attach_metrics(self, version_id: str, metrics: Mapping[str, Any], evaluated_in_round: int | None = None) -> None:
        """Add validation metrics measured on a version (e.g. by the sites at the start of the next round)."""
        with self._lock:
            v = self.get(version_id)
            v["metrics"].update(jsonable(dict(metrics)))
            if evaluated_in_round is not None:
                v["evaluated_in_round"] = evaluated_in_round
            self._save()

    def lineage(self, version_id: str) -> list[dict[str, Any]]:
        """The version and its ancestors, newest first, walking ``parent`` links.

        Raises:
            InputError: unknown version or a cycle in the parent links.
        """
        chain, seen = [], set()
        current: str | None = version_id
        while current is not None:
            if current in seen:
                raise InputError(f"{self.path}: parent links of {version_id!r} form a cycle at {current!r}")
            seen.add(current)
            v = self.get(current)
            chain.append(v)
            current = v.get("parent")
        return chain

    def resolve_file(self, version: Mapping[str, Any]) -> Path:
        """Absolute path of a version's saved file.

        Raises:
            InputError: the version has no saved file.
        """
        if not version.get("file"):
            raise InputError(f"model version {version['version']!r} has no saved file (only its weight hash was recorded); "
                             f"choose one of: {', '.join(v['version'] for v in self.versions if v.get('file')) or 'none'}")
        return (self.folder.parent / version["file"]).resolve()

    def _save(self) -> None:
        atomic_write_json(self.path, self.data)


def _bump(version: str, part: str) -> str:
    try:
        major, minor, patch = (int(x) for x in version.split("."))
    except ValueError as e:
        raise InputError(f"metadata version {version!r} is not MAJOR.MINOR.PATCH") from e
    return {"major": f"{major + 1}.0.0", "minor": f"{major}.{minor + 1}.0", "patch": f"{major}.{minor}.{patch + 1}"}[part]


def export_version(governance_dir: str | os.PathLike, version_id: str, bundle: str | os.PathLike, out: str | os.PathLike,
                   bump: str = "patch", note: str | None = None, overrides: Mapping[str, Any] | None = None,
                   torchscript: bool = True) -> Path:
    """Write a copy of ``bundle`` with a registered model version as its model, ready to share.

    The copy gets ``models/model.pt`` (plain state dict), ``models/model.ts`` (TorchScript via MONAI's
    ``ckpt_export``), ``models/provenance.json`` (job, version, hashes, lineage, privacy), and
    ``configs/metadata.json`` with the version bumped and a changelog entry. A DP-trained model (no
    BatchNorm running statistics) sets ``norm`` to ``group`` in the copy's configs so it loads as is.
    The copy is built in a temporary folder and renamed into place.

    Args:
        governance_dir: the job's governance folder (holds ``registry.json``).
        version_id: the version to export (one with a saved file).
        bundle: source bundle folder or name under ``bundles/``.
        out: destination folder of the new bundle (replaced if it exists).
        bump: ``major``, ``minor`` or ``patch``.
        note: extra changelog text.
        overrides: top-level config values to set in the copy's configs (e.g. ``{"spatial_size": [32, 32]}``).
        torchscript: also write ``models/model.ts``.

    Returns:
        The exported bundle folder.

    Raises:
        InputError: unknown version, no saved file, file altered since it was registered, bad bundle.
    """
    import torch

    from monai_fl_ext.bundle import METADATA, resolve_bundle

    registry = ModelRegistry.open(governance_dir)
    version = registry.get(version_id)
    src = registry.resolve_file(version)
    if not src.is_file():
        raise InputError(f"{src}: file of model version {version_id!r} is missing")
    if sha256_file(src) != version.get("file_sha256"):
        raise InputError(f"{src}: SHA-256 differs from the one registered for {version_id!r} "
                         f"(overwritten by a later save or altered); export refused")
    state = load_state(src)
    bundle_root = resolve_bundle(bundle)
    metadata = read_json(bundle_root / METADATA)
    settings = dict(overrides or {})
    if not any(k.endswith("running_mean") for k in state):
        settings.setdefault("norm", "group")
    new_version = _bump(str(metadata.get("version", "0.0.0")), bump)
    privacy = version.get("privacy", {})
    eps = privacy.get("max_epsilon")
    text = (f"federated global model {version_id} of job {registry.data.get('job_id') or '?'} "
            f"({version.get('algorithm') or registry.data['job'].get('algorithm') or '?'}, round {version.get('round')}), "
            f"weights sha256 {version.get('weights_sha256') or tensor_sha256(state)}"
            + (f", DP epsilon {eps:.4g}" if isinstance(eps, (int, float)) else "")
            + (f"; {note}" if note else ""))
    metadata["version"] = new_version
    metadata["changelog"] = {new_version: text, **metadata.get("changelog", {})}
    with atomic_output_dir(out) as tmp:
        shutil.copytree(bundle_root, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("eval", "models", "__pycache__", "*.pyc"))
        for cfg in sorted((tmp / "configs").glob("*.json")):
            if cfg.name == "metadata.json":
                continue
            content = json.loads(cfg.read_text())
            changed = {k: v for k, v in settings.items() if k in content and content[k] != v}
            if changed:
                content.update(changed)
                cfg.write_text(json.dumps(content, indent=4) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
        (tmp / "models").mkdir()
        torch.save({k: torch.as_tensor(np.asarray(v)) if not hasattr(v, "detach") else v for k, v in state.items()}, tmp / "models" / "model.pt")
        provenance = {"job_id": registry.data.get("job_id"), "version": version_id, "bundle_version": new_version,
                      "source_file_sha256": version.get("file_sha256"), "weights_sha256": tensor_sha256(state),
                      "model_pt_sha256": sha256_file(tmp / "models" / "model.pt"),
                      "lineage": [v["version"] for v in registry.lineage(version_id)], "privacy": privacy,
                      "metrics": version.get("metrics", {}), "job": registry.data.get("job", {}), "config_changes": settings}
        if torchscript:
            from monai.bundle import ckpt_export

            config = tmp / "configs" / ("inference.json" if (tmp / "configs" / "inference.json").exists() else "train.json")
            ckpt_export(net_id="network_def", filepath=str(tmp / "models" / "model.ts"), ckpt_file=str(tmp / "models" / "model.pt"),
                        meta_file=str(tmp / "configs" / "metadata.json"), config_file=str(config), bundle_root=str(tmp))
            provenance["model_ts_sha256"] = sha256_file(tmp / "models" / "model.ts")
        (tmp / "models" / "provenance.json").write_text(to_json(provenance))
    return Path(out)
