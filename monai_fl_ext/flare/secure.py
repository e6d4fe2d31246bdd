"""Secure aggregation in FLARE: the ``SecureAggregate`` server workflow and the site-side task handler.

Each round runs four FLARE tasks over :mod:`monai_fl_ext.secagg`: ``secagg_advertise`` (public keys),
``secagg_share`` (sealed Shamir shares, relayed by the server), ``train`` (the model goes out with the
share mailbox; a masked vector of ``[w, w * update]`` comes back) and ``secagg_unmask`` (survivors'
shares). The server only ever holds masked vectors and the unmasked sum; it applies the weighted mean
update, or, when the protocol aborts (fewer than ``threshold`` sites, a secret that does not
reconstruct), leaves the global model unchanged and goes on to the next round.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from monai_fl_ext.flare.controller import NUM_STEPS, FederatedBundleController
from monai_fl_ext.secagg import (
    RoundConfig,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggServer,
    default_threshold,
    flatten,
    unflatten,
)

ADVERTISE, SHARE, UNMASK = "secagg_advertise", "secagg_share", "secagg_unmask"
TASKS = (ADVERTISE, SHARE, UNMASK)
CONFIG, PAYLOAD, MESSAGE, INFO = "secagg_config", "secagg_payload", "secagg_message", "secagg_info"
MASKED = "masked"
SETTINGS = ("bits", "clip_range", "max_weight", "threshold", "report_counts")
DEFAULTS: dict[str, Any] = {"bits": 32, "clip_range": 8.0, "max_weight": 4096.0, "threshold": None, "report_counts": True}


def layout(params: dict[str, Any]) -> list[str]:
    """The order in which every party flattens a model's tensors."""
    return sorted(params)


class SecureAggregateController(FederatedBundleController):
    """:class:`FederatedBundleController` whose rounds aggregate by pairwise masking: the server never sees one site's update.

    Per-site weights (steps, samples or uniform, times ``site_weights``) are computed at the sites and
    masked with the update, so the server learns only the totals. Cross-site evaluation covers the
    global model only, and the drift diagnostics are replaced by the norms sites report about their own
    update. SCAFFOLD (per-site control variates) and client-level DP (clipping each update at the server)
    need the server to see individual updates and are refused.

    Args:
        secure_aggregation: protocol settings: ``bits`` (32 or 64), ``clip_range`` (coordinates are clipped to
            +-clip_range), ``max_weight`` (largest site weight), ``threshold`` (t of n; default a strict
            majority, at least 2), ``report_counts`` (sites report their sample and step counts to the ledger).
        **kwargs: :class:`FederatedBundleController` arguments.
    """

    shares_local_models = False

    # *args and **kwargs: FLARE's job exporter then reads the base class's named arguments too
    def __init__(self, *args: Any, secure_aggregation: dict | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unknown = set(secure_aggregation or {}) - set(SETTINGS)
        if unknown:
            raise ValueError(f"unknown secure_aggregation settings {sorted(unknown)}; known: {SETTINGS}")
        if self.algorithm == "scaffold" or self.client_dp_clip > 0:
            raise ValueError("secure aggregation cannot be combined with SCAFFOLD or server-side client-level DP: "
                             "both need each site's individual update at the server")
        self.secure_aggregation = {**DEFAULTS, **(secure_aggregation or {})}

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "secure_aggregation": dict(self.secure_aggregation)}

    def _round_config(self, model: FLModel, sites: list[str]) -> RoundConfig:
        s = self.secure_aggregation
        length = int(sum(np.asarray(v).size for v in model.params.values()))
        return RoundConfig(job_id=self.fl_ctx.get_job_id(), round=self.current_round, sites=tuple(sites),
                           threshold=int(s["threshold"] or default_threshold(len(sites))), length=length,
                           bits=int(s["bits"]), clip_range=float(s["clip_range"]), max_weight=float(s["max_weight"]))

    def _step(self, task: str, sites: list[str], meta: dict[str, Any]) -> list[FLModel]:
        return self.broadcast_model(
            data=FLModel(params={}, meta=meta, current_round=self.current_round), task_name=task, targets=sites,
            min_responses=min(self.min_clients, len(sites)), timeout=self.train_timeout,
            wait_time_after_min_received=self.wait_time_after_min_received, blocking=True)

    def _collect(self, server_step, results: list[FLModel], failed: dict[str, str], payload: str = MESSAGE) -> None:
        for r in results:
            name = r.meta.get("client_name", "?")
            if r.meta.get("error"):
                failed.setdefault(name, r.meta["error"])
                continue
            try:
                server_step(name, r.meta.get(payload) if payload else r)
            except SecAggError as e:
                self.warning(str(e))
                failed.setdefault(name, str(e))

    def _train_round(self, model: FLModel, sites: list[str], start: float):
        cfg = self._round_config(model, sites)
        server = SecAggServer(cfg)
        header = {CONFIG: cfg.to_dict()}
        failed: dict[str, str] = {}
        rejected: dict[str, str] = {}
        results: list[FLModel] = []
        ok: list[FLModel] = []
        try:
            self._collect(server.add_keys, self._step(ADVERTISE, sites, header), failed)
            directory = server.directory()
            self._collect(server.add_shares, self._step(SHARE, sorted(directory), {**header, PAYLOAD: directory}), failed)
            mailbox = server.mailbox()
            model.meta.update({**header, PAYLOAD: mailbox, "weighting": self.weighting, "site_weights": self.site_weights,
                               "report_counts": bool(self.secure_aggregation["report_counts"])})
            results = self.broadcast_model(
                data=model, task_name="train", targets=sorted(mailbox), min_responses=min(self.min_clients, len(mailbox)),
                timeout=self.train_timeout, wait_time_after_min_received=self.wait_time_after_min_received, blocking=True)
            answered, train_failed = self._split_results(sorted(mailbox), results)
            failed.update(train_failed)
            ok = self._accept_masked(server, answered, rejected)
            failed.update(rejected)
            if not self._may_aggregate(results, ok, failed):
                return self._secure_record(ok, failed, rejected, start, server, None), None, ok
            request = server.unmask_request()
            self._collect(server.add_unmask, self._step(UNMASK, request["survivors"], {**header, PAYLOAD: request}), failed)
            result = server.aggregate()
        except SecAggAbort as e:
            self.warning(f"round {self.current_round}: {e}; the global model is unchanged")
            return self._secure_record(ok, {**failed, **rejected}, rejected, start, server, None, aborted=str(e)), None, ok
        keys = layout(model.params)
        mean = unflatten(result.mean, {k: np.asarray(model.params[k], dtype=np.float32) for k in keys}, keys)
        return self._secure_record(ok, failed, rejected, start, server, result), mean, ok

    def _accept_masked(self, server: SecAggServer, answered: list[FLModel], rejected: dict[str, str]) -> list[FLModel]:
        """The answers whose masked vector the protocol accepted; the others go to ``rejected`` with the reason.

        A refused site is never added: the protocol then treats it as dropped and removes its pairwise masks.
        """
        accepted = []
        for r in answered:
            name = r.meta["client_name"]
            why = self._check_versions(r)
            if why is None:
                try:
                    masked = (r.params or {}).get(MASKED)
                    server.add_masked(name, {**r.meta.get(MESSAGE, {}), MASKED: None if masked is None else np.asarray(masked)})
                    accepted.append(r)
                    continue
                except SecAggError as e:
                    why = str(e)
            self.warning(f"round {self.current_round}: update from {name} rejected: {why}")
            rejected[name] = why
        return accepted

    def _secure_record(self, ok: list[FLModel], failed: dict[str, str], rejected: dict[str, str], start: float,
                       server: SecAggServer, result, aborted: str | None = None) -> dict[str, Any]:
        """The round's record: what sites report in the clear, and the protocol's outcome (never a single update)."""
        record = self._round_record(ok, failed, time.time() - start)
        record["sites_rejected"] = dict(rejected)
        info = {r.meta["client_name"]: r.meta.get(INFO, {}) for r in ok}
        record["weights"] = {}  # computed and masked at the sites; only the total is known
        record["update_norm"] = {s: float(m.get("update_norm", 0.0)) for s, m in info.items()}
        record["secure_aggregation"] = {
            **{k: getattr(server.config, k) for k in ("threshold", "bits", "clip_range", "max_weight")},
            "sites": list(server.config.sites),
            "contributors": result.contributors if result else [],
            "dropped": result.dropped if result else [],
            "total_weight": result.total_weight if result else None,
            "error_bound": result.error_bound if result else None,
            "clipped_fraction": {s: m.get("clipped_fraction") for s, m in info.items()},
            "rejected": list(server.rejected),
            "aborted": aborted,
        }
        return record


class SecureAggregationSite:
    """A site's side of the protocol inside the FLARE client script: one :class:`SecAggClient` per round.

    Args:
        site: this site's name.
        job_id: the FLARE job id this site runs in; a round configured for another job is refused.
    """

    def __init__(self, site: str, job_id: str) -> None:
        self.site, self.job_id = site, job_id
        self.client: SecAggClient | None = None

    def _config(self, meta: dict[str, Any]) -> RoundConfig:
        cfg = RoundConfig.from_dict(meta[CONFIG])
        if cfg.job_id != self.job_id:
            raise SecAggError(f"{cfg.where(self.site)}: the round is configured for job {cfg.job_id!r}, this site runs {self.job_id!r}")
        return cfg

    def handle(self, task: str, model: FLModel) -> FLModel:
        """Answer a ``secagg_*`` task."""
        meta = model.meta or {}
        cfg = self._config(meta)
        if task == ADVERTISE:
            self.client = SecAggClient(cfg, self.site)
            return FLModel(params={}, meta={MESSAGE: self.client.advertise()})
        client = self._current(cfg)
        if task == SHARE:
            return FLModel(params={}, meta={MESSAGE: client.share_keys(meta[PAYLOAD])})
        if task == UNMASK:
            return FLModel(params={}, meta={MESSAGE: client.unmask(**meta[PAYLOAD])})
        raise SecAggError(f"{cfg.where(self.site)}: unknown secure aggregation task {task!r}")

    def _current(self, cfg: RoundConfig) -> SecAggClient:
        if self.client is None or self.client.config != cfg:
            raise SecAggError(f"{cfg.where(self.site)}: no key advertisement for this round (stale or replayed task)")
        return self.client

    def prepare_training(self, model: FLModel) -> None:
        """Before local training: open the shares in the mailbox, so a protocol problem fails before training."""
        client = self._current(self._config(model.meta))
        client.receive_shares(model.meta[PAYLOAD])

    def mask(self, model: FLModel, result: FLModel) -> FLModel:
        """The masked replacement of a trained ``result``: ``[w, w * update]`` in the ring, plus what the site discloses."""
        client = self._current(self._config(model.meta))
        meta = dict(result.meta)
        base = {"steps": float(meta.get(NUM_STEPS, 1)), "samples": float(meta.get("num_samples", 1)), "uniform": 1.0}
        weight = base[model.meta.get("weighting", "steps")] * float(model.meta.get("site_weights", {}).get(self.site, 1.0))
        keys = layout(model.params)
        missing = [k for k in keys if k not in result.params]
        if missing:
            raise SecAggError(f"{client.config.where(self.site)}: the local update lacks {missing[:3]}")
        vector = flatten({k: torch.as_tensor(result.params[k]).numpy() for k in keys}, keys)
        masked, info = client.mask(vector, weight)
        if not model.meta.get("report_counts", True):
            meta.pop(NUM_STEPS, None)
            meta.pop("num_samples", None)
        meta.update({MESSAGE: {"job_id": client.config.job_id, "round": client.config.round, "site": self.site},
                     INFO: info, "payload_bytes": int(masked.nbytes)})
        return FLModel(params={MASKED: torch.from_numpy(masked)}, params_type=ParamsType.DIFF, metrics=result.metrics, meta=meta)
