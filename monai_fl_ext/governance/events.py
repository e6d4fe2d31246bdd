"""Server-side governance recorder: the FLARE server workflow calls it as events happen.

One :class:`GovernanceRecorder` per job writes, under ``<server output>/governance/``:

- ``audit_trail.jsonl`` (+ ``.pub.pem``, ``.head.json``): every event, hash-chained and signed;
- ``registry.json``: every global model version with hashes, lineage, privacy and metrics;
- ``ledger.json``: each site's contribution per round (statistics only).

It imports no FLARE code: the controller passes plain values (names, numbers, dicts of arrays for
hashing), so the recorder tests without FLARE. A recorder never stores weights: ``params`` given to it
are hashed and dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_fl_ext.governance.audit import AuditTrail, jsonable
from monai_fl_ext.governance.ledger import ContributionLedger
from monai_fl_ext.governance.registry import INITIAL, ModelRegistry, load_state, tensor_sha256

GOVERNANCE_DIR = "governance"
TRAIL_FILE = "audit_trail.jsonl"
KEY_FILE = "keys/audit_signing_key.pem"
PRIVACY_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "max_grad_norm", "budget_epsilon", "accountant")
SUMMARY_KEYS = ("sites_ok", "sites_failed", "weights", "steps", "samples", "global_metrics", "update_norm", "cosine_to_aggregate",
                "max_epsilon", "client_dp", "seconds", "secure_aggregation")


def _privacy_fields(privacy: Mapping[str, Any] | None) -> dict[str, Any]:
    """A site's privacy report flattened for the ledger (``steps`` becomes ``dp_steps``)."""
    if not privacy:
        return {}
    out = {k: privacy[k] for k in PRIVACY_KEYS if k in privacy}
    if "steps" in privacy:
        out["dp_steps"] = privacy["steps"]
    return out


class GovernanceRecorder:
    """Writes the audit trail, model registry and contribution ledger of one job.

    Args:
        folder: governance folder, normally ``<server output>/governance``.
        job_id: the FLARE job id.
        key_path: the server's Ed25519 signing key (PEM); created on first use. Default
            ``<folder>/keys/audit_signing_key.pem``; pass a path in the server's workspace (e.g. next to its
            startup kit) to sign every job with the same key and keep it apart from the outputs.
        clock: time source (seconds since the epoch).

    Raises:
        InputError: an existing trail in ``folder`` fails verification (it is never overwritten).
    """

    def __init__(self, folder: str | os.PathLike, job_id: str = "", key_path: str | os.PathLike | None = None,
                 clock: Any = time.time) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id
        self.clock = clock
        self.trail = AuditTrail(self.folder / TRAIL_FILE, key_path or self.folder / KEY_FILE)
        self.registry = ModelRegistry(self.folder, job_id)
        self.ledger = ContributionLedger(self.folder, job_id)
        self._privacy: dict[str, dict[str, Any]] = {}  # latest privacy report per site
        self._round_started: dict[int, float] = {}

    def _audit(self, event: str, **fields: Any) -> dict[str, Any]:
        return self.trail.append(event, {"job_id": self.job_id, **fields}, when=self.clock())

    # ---- job ------------------------------------------------------------------------------------
    def job_start(self, config: Mapping[str, Any], sites: Sequence[str] | None = None,
                  initial_params: Mapping[str, Any] | None = None) -> None:
        """The job starts.

        Args:
            config: the server workflow's settings (algorithm, rounds, weighting...); ``secure_aggregation``
                and ``privacy`` entries, if present, are recorded as the job's settings.
            sites: the sites the job expects.
            initial_params: the initial global model (hashed as version ``initial``; not stored).
        """
        config = dict(config)
        secagg = config.get("secure_aggregation") or "off"
        self.registry.set_job(job_id=self.job_id, algorithm=config.get("algorithm"), config=config, expected_sites=list(sites or []),
                              secure_aggregation=secagg, privacy_settings=config.get("privacy") or {}, started=self.clock(),
                              status="running", audit_key_id=self.trail.key_id)
        weights = tensor_sha256(initial_params) if initial_params is not None else None
        if initial_params is not None:
            self.registry.add(INITIAL, "initial", None, None, weights)
        self._audit("job_start", config=config, sites=list(sites or []), secure_aggregation=secagg, initial_weights_sha256=weights,
                    audit_key_id=self.trail.key_id)

    def job_end(self, status: str, final_metrics: Mapping[str, Any] | None = None) -> None:
        """The job ends (``completed``, ``stopped at round 3: ...``, ``failed: ...``).

        Args:
            status: the job's final status.
            final_metrics: validation metrics of the final global model, attached to the last ``final`` version.
        """
        finals = [v for v in self.registry.versions if v["kind"] == "final"]
        if final_metrics and finals:
            self.registry.attach_metrics(finals[-1]["version"], final_metrics)
        self.registry.set_job(status=status, ended=self.clock())
        self._audit("job_end", status=status, final_metrics=dict(final_metrics or {}), versions=len(self.registry.versions),
                    final_version=finals[-1]["version"] if finals else None)

    # ---- rounds and sites -------------------------------------------------------------------------
    def round_start(self, rnd: int, sites: Sequence[str]) -> None:
        """A round starts with the sites asked to train."""
        self._round_started[rnd] = self.clock()
        self._audit("round_start", round=rnd, sites=sorted(sites))

    def site_joined(self, rnd: int, site: str, detail: str | None = None) -> None:
        """A site takes part for the first time (or again after being dropped)."""
        self._audit("site_joined", round=rnd, site=site, detail=detail)

    def site_dropped(self, rnd: int, site: str, reason: str) -> None:
        """A site was left out of a round (no answer, error, timeout); recorded in the ledger too."""
        self.ledger.record(rnd, site, "dropped", reason=reason, timestamp=self.clock())
        self._audit("site_dropped", round=rnd, site=site, reason=reason)

    def update_accepted(self, rnd: int, site: str, stats: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """A site's update was accepted for aggregation.

        Args:
            rnd: round.
            site: site name.
            stats: scalars: ``update_norm``, ``cosine_to_aggregate``, ``reported_norm`` (pre-masking norm under
                secure aggregation), ``samples``, ``local_steps``, ``duration_s``, ``weight``, and ``privacy`` (the
                site's privacy report: epsilon, delta, noise_multiplier, sample_rate, max_grad_norm, steps, budget).
            **more: further scalars.

        Returns:
            The ledger entry.

        Raises:
            InputError: a statistic is not a scalar (weights never enter the ledger).
        """
        stats = {**dict(stats or {}), **more}
        privacy = stats.pop("privacy", None)
        if privacy:
            self._privacy[site] = dict(privacy)
        if "duration_s" not in stats and rnd in self._round_started:
            stats["duration_s"] = self.clock() - self._round_started[rnd]
        entry = self.ledger.record(rnd, site, "accepted", timestamp=self.clock(), **stats, **_privacy_fields(privacy))
        self._audit("update_accepted", round=rnd, site=site, stats={k: v for k, v in entry.items() if k not in ("round", "site", "status")})
        return entry

    def update_rejected(self, rnd: int, site: str, why: str, stats: Mapping[str, Any] | None = None) -> None:
        """A site's update was refused (malformed, non-finite, over a norm bound, too late...), with the reason."""
        stats = dict(stats or {})
        privacy = stats.pop("privacy", None)
        entry = self.ledger.record(rnd, site, "rejected", reason=why, timestamp=self.clock(), **stats, **_privacy_fields(privacy))
        self._audit("update_rejected", round=rnd, site=site, reason=why,
                    stats={k: v for k, v in entry.items() if k not in ("round", "site", "status", "reason")})

    def budget_refusal(self, rnd: int, site: str, detail: str | Mapping[str, Any]) -> None:
        """A site refused to train because its privacy budget would be exceeded."""
        detail = dict(detail) if isinstance(detail, Mapping) else {"detail": str(detail)}
        self.ledger.record(rnd, site, "rejected", reason=f"privacy budget: {detail.get('detail', detail)}", timestamp=self.clock(),
                           **_privacy_fields(detail))
        self._audit("budget_refusal", round=rnd, site=site, **detail)

    # ---- models -----------------------------------------------------------------------------------
    def _spent(self, summary: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Privacy spent so far: per-site epsilon and the maximum (sites hold disjoint patients)."""
        for site, p in ((summary or {}).get("privacy") or {}).items():
            self._privacy[site] = dict(p)
        eps = {s: p.get("epsilon") for s, p in self._privacy.items() if isinstance(p.get("epsilon"), (int, float))}
        out: dict[str, Any] = {"epsilon_per_site": eps, "max_epsilon": max(eps.values()) if eps else None}
        if self._privacy:
            any_p = next(iter(self._privacy.values()))
            out["delta"] = any_p.get("delta")
            out["settings_per_site"] = {s: {k: p.get(k) for k in ("noise_multiplier", "max_grad_norm", "sample_rate", "budget_epsilon")}
                                        for s, p in self._privacy.items()}
        if (summary or {}).get("client_dp"):
            out["client_dp"] = dict(summary["client_dp"])
        return out

    def aggregated(self, rnd: int, summary: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The round's updates were aggregated into a new global model (version ``round-<rnd>``).

        Args:
            rnd: round.
            summary: the round's record (``sites_ok``, ``weights``, ``global_metrics`` measured by the sites on the
                model they received, ``update_norm``, ``cosine_to_aggregate`` per site, ``privacy`` per site,
                ``max_epsilon``, ``client_dp``, ``seconds``, ``secure_aggregation``...); other keys are ignored.
            params: the new global model, hashed (not stored); None records the version without a weight hash.

        Returns:
            The registered version.
        """
        summary = dict(summary)
        parent = self.registry.latest_round_version(before_round=rnd)
        if parent is not None and summary.get("global_metrics"):
            self.registry.attach_metrics(parent["version"], summary["global_metrics"], evaluated_in_round=rnd)
        for site, cos in (summary.get("cosine_to_aggregate") or {}).items():
            self.ledger.update(rnd, site, cosine_to_aggregate=cos)
        for site, w in (summary.get("weights") or {}).items():
            self.ledger.update(rnd, site, weight=w)
        privacy = self._spent(summary)
        version = self.registry.add(f"round-{rnd}", "round", rnd, parent["version"] if parent else None,
                                    tensor_sha256(params) if params is not None else None, privacy=privacy,
                                    sites=list(summary.get("sites_ok") or []), aggregation_weights=summary.get("weights") or {})
        self._audit("aggregated", round=rnd, version=version["version"], weights_sha256=version["weights_sha256"],
                    summary={k: summary[k] for k in SUMMARY_KEYS if k in summary}, max_epsilon=privacy["max_epsilon"])
        return version

    def model_saved(self, rnd: int, name: str, path: str | os.PathLike, metrics: Mapping[str, Any] | None = None,
                    params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A global model checkpoint was written (e.g. ``best_global_model.pt``, ``final_global_model.pt``).

        Args:
            rnd: the round in which it was saved.
            name: checkpoint name; ``best``/``final`` in it set the version kind.
            path: the file written.
            metrics: validation metrics known for it.
            params: the weights saved (hashed; default: read back from ``path``).

        Returns:
            The registered version, e.g. ``best@round-2``; its parent is the version with the same weights
            (or the latest round version).
        """
        stem = Path(name).stem
        kind = "best" if "best" in stem else "final" if "final" in stem else stem
        weights = tensor_sha256(params if params is not None else load_state(path))
        twin = self.registry.find(weights)
        parent = twin or self.registry.latest_round_version()
        version = self.registry.add(f"{kind}@round-{rnd}", kind, rnd, parent["version"] if parent else None, weights, file=path,
                                    metrics={**(twin or {}).get("metrics", {}), **dict(metrics or {})},
                                    privacy=(parent or {}).get("privacy") or self._spent(), checkpoint=Path(name).name)
        self._audit("model_saved", round=rnd, name=Path(name).name, version=version["version"], parent=version["parent"],
                    file_sha256=version["file_sha256"], weights_sha256=weights, metrics=dict(metrics or {}))
        return version

    def note(self, event: str, **fields: Any) -> None:
        """Any other event worth keeping (scalars, strings, lists and mappings only)."""
        self._audit(event, **jsonable(fields))

