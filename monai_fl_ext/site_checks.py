"""What a site checks before it joins a round: its own data, and whether its software matches the job's.

- Data: every training and validation item's file exists (and, optionally, decodes as an image) and its
  label is a 0/1 vector of the datalist's label count. Policy ``fail`` reports the first problems and
  the site answers every task with that error (the federation goes on without it); policy ``skip``
  writes a cleaned datalist next to the site's outputs and trains on the rest, listing what it dropped.
- Software: the bundle's version and config hash and the key packages (monai, torch, opacus, nvflare)
  are reported with every update; the server compares them with the job's (see :func:`compare_versions`).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_write_json, read_json

DATA_POLICIES = ("fail", "skip")
VERSION_POLICIES = ("refuse", "warn", "ignore")
PACKAGES = ("monai", "torch", "opacus", "nvflare")
CHECKED_SPLITS = ("training", "validation")


def _image_problem(path: Path, decode: bool) -> str | None:
    if not path.is_file():
        return "file not found"
    if decode:
        from PIL import Image

        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # PIL raises many types for corrupt files
            return f"does not decode ({type(e).__name__}: {e})"
    return None


def check_site_data(datalist_path: str | os.PathLike, dataset_dir: str | os.PathLike, site: str, policy: str = "fail",
                    decode: bool = False, clean_path: str | os.PathLike | None = None) -> tuple[Path, list[str]]:
    """Check a site's datalist before training.

    Args:
        datalist_path: the site's datalist JSON.
        dataset_dir: folder the item paths are relative to.
        site: the site's name (every message names it).
        policy: ``fail`` or ``skip`` (see the module docstring).
        decode: also open every image (slower; catches corrupt files before training does).
        clean_path: where ``skip`` writes the cleaned datalist (default: next to the original, ``*.checked.json``).

    Returns:
        ``(datalist to train on, problems found)``.

    Raises:
        InputError: with ``fail``, any problem; with either policy, no training items left or an unreadable datalist.
    """
    if policy not in DATA_POLICIES:
        raise InputError(f"{site}: data policy must be one of {DATA_POLICIES}, got {policy!r}")
    datalist_path = Path(datalist_path)
    try:
        datalist = read_json(datalist_path)
    except InputError as e:
        raise InputError(f"{site}: {e}") from e
    labels = datalist.get("labels") or []
    problems, kept = [], {}
    for split in CHECKED_SPLITS:
        kept[split] = []
        for i, item in enumerate(datalist.get(split) or []):
            where = f"{site}: {datalist_path.name} {split}[{i}]"
            label = item.get("label") if isinstance(item, dict) else None
            keys = [k for k in ("image", "drug", "target", "features") if isinstance(item, dict) and k in item]
            if not keys:
                problems.append(f"{where}: item has no input path")
                continue
            if not isinstance(label, list) or (labels and len(label) != len(labels)) or any(v not in (0, 1) for v in label):
                problems.append(f"{where}: label must be a 0/1 list of length {len(labels)}, got {label!r}")
                continue
            bad = [(item[k], why) for k in keys if (why := _image_problem(Path(dataset_dir) / item[k], decode and k == "image"))]
            if bad:
                problems.append(f"{where}: {bad[0][0]}: {bad[0][1]}")
                continue
            kept[split].append(item)
    if not kept["training"]:
        raise InputError(f"{site}: no usable training items in {datalist_path}" + (f" ({problems[0]} ...)" if problems else " (empty partition)"))
    if problems and policy == "fail":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{problems[0]}{more}; fix the data or run the site with data policy 'skip'")
    if not problems:
        return datalist_path, []
    target = Path(clean_path) if clean_path else datalist_path.with_suffix(".checked.json")
    atomic_write_json(target, {**datalist, **kept})
    return target, problems


def bundle_fingerprint(bundle_root: str | os.PathLike) -> dict[str, str]:
    """The bundle's version (``configs/metadata.json``) and the SHA-256 of its ``configs/train.json``.

    The hash is cut to 16 hex digits (64 bits: ample to tell configs apart) because FLARE's job generator
    warns that a full 64-digit hex string in a job parameter may be a secret.
    """
    root = Path(bundle_root)
    version = json.loads((root / "configs" / "metadata.json").read_text()).get("version", "?")
    digest = hashlib.sha256((root / "configs" / "train.json").read_bytes()).hexdigest()[:16]
    return {"bundle_version": str(version), "bundle_config_sha256": digest}


def software_versions(bundle_root: str | os.PathLike) -> dict[str, str]:
    """What a site reports with its updates: the bundle fingerprint and the key packages' versions."""
    out = bundle_fingerprint(bundle_root)
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _comparable(key: str, value: str) -> str:
    # a CUDA and a CPU build of the same torch release are the same release ("2.13.0+cu126" vs "2.13.0+cpu")
    return value.split("+")[0] if key == "torch" else value


def compare_versions(expected: dict[str, str], reported: dict[str, Any]) -> list[str]:
    """Differences between the job's versions and a site's, each naming both sides (empty when they match)."""
    diffs = []
    for key, want in sorted(expected.items()):
        got = reported.get(key)
        if got is None:
            diffs.append(f"{key}: the site did not report it (job: {want})")
        elif _comparable(key, str(got)) != _comparable(key, str(want)):
            diffs.append(f"{key}: site {got}, job {want}")
    return diffs
