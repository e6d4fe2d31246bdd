"""Server workflow for federated bundle training: FedAvg, FedProx, SCAFFOLD and FedOpt in one controller.

Built on FLARE's ``BaseFedAvg`` (sampling, broadcast, weighted aggregation helper, persistor), it adds
what a hospital consortium needs from a run:

- rounds continue with the sites that answered (``min_clients``, ``train_timeout``,
  ``wait_time_after_min_received``); each left-out site is logged with the reason;
- aggregation weights by local steps (default), samples or uniform, times explicit per-site weights;
- per-round history (site and global validation metrics, update norms, pairwise cosine, bytes,
  weights) as JSON and TensorBoard, best and final global checkpoints as plain state dicts;
- a final cross-site evaluation of the global model and of every site's local model on every site.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from monai_fl_ext.algorithms import FEDPROX_MU, SCAFFOLD_CTRL_DIFF, SCAFFOLD_CTRL_GLOBAL, ServerOptimizer
from monai_fl_ext.diagnostics import drift_diagnostics
from monai_fl_ext.io import atomic_write_bytes, atomic_write_json

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"
WEIGHTINGS = ("steps", "samples", "uniform")
GLOBAL_MODEL = "global"
KEY_METRIC = "val_auc"  # the bundles' validation key metric, reported by every site each round


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


class FederatedBundleController(BaseFedAvg):
    """See the module docstring.

    Args:
        num_rounds: federated rounds.
        min_clients: fewest answers a round needs; fewer ends the job with the model so far.
        algorithm: ``fedavg``, ``fedprox``, ``scaffold`` or ``fedopt``.
        fedprox_mu: FedProx proximal weight (sent to sites as ``fedprox_mu`` meta).
        server_optimizer: FedOpt optimizer, ``sgd`` or ``adam``.
        server_lr: FedOpt learning rate.
        server_momentum: FedOpt SGD momentum.
        weighting: ``steps`` (local iterations), ``samples`` (local training items) or ``uniform``.
        site_weights: explicit multipliers per site, e.g. ``{"site-3": 2.0}`` to up-weight a minority hospital.
        train_timeout: seconds a round waits at most (0: no limit).
        wait_time_after_min_received: seconds to wait for the others once ``min_clients`` answered.
        cross_site_eval: evaluate the final global and local models on every site.
        output_dir: where history, TensorBoard, plots and checkpoints go (relative: under the job's run dir).
        key_metric: site metric that selects the best global model.
        client_dp_clip: with a positive value, client-level DP (DP-FedAvg): each site's update is clipped
            to this L2 norm, the uniform mean gets Gaussian noise ``client_dp_noise * clip / n``, and the
            round records the client-level epsilon at ``client_dp_delta``.
        client_dp_noise: DP-FedAvg noise multiplier.
        client_dp_delta: delta of the client-level guarantee.
        aggregator: ``mean`` (weighted FedAvg), ``median``, ``trimmed_mean`` or ``norm_clip`` (:mod:`monai_fl_ext.robust`).
        trim_fraction: ``trimmed_mean``: fraction of sites dropped at each end per coordinate.
        max_update_norm: reject an update whose L2 norm exceeds this (None: no absolute bound).
        max_norm_factor: reject an update whose norm exceeds this many times the median of the other sites' (0: off).
        version_policy: a site reporting other bundle or package versions than ``expected_versions``:
            ``refuse`` (its update is rejected, naming both versions), ``warn`` or ``ignore``.
        clients_per_round: sites drawn each round: a count (>= 1) or a fraction (< 1); None: all. The draw is
            weighted by 1 / (1 + the site's failed rounds so far), so unreliable sites are deprioritised.
        expected_versions: the job's bundle version, bundle config hash and package versions.
        governance: keep the signed audit trail, model registry and contribution ledger under ``output_dir/governance``
            (:mod:`monai_fl_ext.governance`).
        audit_key_path: the server's Ed25519 signing key (created if missing); default: in the server's workspace root,
            apart from the job's outputs.
        resume: continue from the checkpoint a previous run of this job left in ``output_dir/checkpoint`` (the global
            model, round, history, best metric and scheduling state after its last completed round).
        crash_after_round: fault drill: stop the server with an error right after checkpointing this round.
        persistor_id: id of FLARE's model persistor component.
    """

    shares_local_models = True  # the server sees each site's update (cross-site evaluation of local models)

    def __init__(
        self,
        num_rounds: int = 3,
        min_clients: int = 1,
        algorithm: str = "fedavg",
        fedprox_mu: float = 0.01,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        server_momentum: float = 0.6,
        weighting: str = "steps",
        site_weights: dict | None = None,
        train_timeout: float = 0,
        wait_time_after_min_received: float = 30,
        cross_site_eval: bool = True,
        output_dir: str = "fl_outputs",
        key_metric: str = KEY_METRIC,
        client_dp_clip: float = 0.0,
        client_dp_noise: float = 0.0,
        client_dp_delta: float = 1e-5,
        aggregator: str = "mean",
        trim_fraction: float = 0.1,
        max_update_norm: float | None = None,
        max_norm_factor: float = 100.0,
        version_policy: str = "refuse",
        clients_per_round: float | None = None,
        expected_versions: dict | None = None,
        governance: bool = True,
        audit_key_path: str = "",
        resume: bool = False,
        crash_after_round: int | None = None,
        persistor_id: str = "persistor",
    ) -> None:
        super().__init__(num_rounds=num_rounds, persistor_id=persistor_id, ignore_result_error=True)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        # every argument under its own name: FLARE's job exporter reads them back from the instance
        self.min_clients = min_clients
        self.algorithm = algorithm
        self.fedprox_mu = fedprox_mu
        self.server_optimizer = server_optimizer
        self.server_lr = server_lr
        self.server_momentum = server_momentum
        self.weighting = weighting
        self.site_weights = dict(site_weights or {})
        self.train_timeout = train_timeout
        self.wait_time_after_min_received = wait_time_after_min_received
        self.cross_site_eval = cross_site_eval
        self.output_dir = output_dir
        self.key_metric = key_metric
        self.client_dp_clip = client_dp_clip
        self.client_dp_noise = client_dp_noise
        self.client_dp_delta = client_dp_delta
        self.aggregator = aggregator
        self.trim_fraction = trim_fraction
        self.max_update_norm = max_update_norm
        self.max_norm_factor = max_norm_factor
        self.version_policy = version_policy
        self.clients_per_round = clients_per_round
        self.expected_versions = dict(expected_versions or {})
        self.governance = governance
        self.audit_key_path = audit_key_path
        self.resume = resume
        self.crash_after_round = crash_after_round

    # ---- outputs -------------------------------------------------------------------------
    def _out(self) -> Path:
        out = Path(self.output_dir)
        if not out.is_absolute():
            out = Path(self.engine.get_workspace().get_run_dir(self.fl_ctx.get_job_id())) / out
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _writer(self, name: str):
        if name not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[name] = SummaryWriter(log_dir=str(self._out() / "tensorboard" / name))
        return self._writers[name]

    def _save_state_dict(self, params: dict[str, Any], name: str) -> None:
        import io

        buf = io.BytesIO()
        torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, buf)
        atomic_write_bytes(self._out() / "models" / name, buf.getvalue())

    # ---- the workflow --------------------------------------------------------------------
    def run(self) -> None:
        self._writers: dict[str, Any] = {}
        self.history: dict[str, Any] = {"config": self._config(), "rounds": [], "status": "running"}
        model = self.load_model()
        state = self._load_checkpoint(model) if self.resume else {}
        self._gov = self._recorder(model, state)
        try:
            self._run_rounds(model, state)
        except Exception as e:
            if self._gov is not None:
                self._gov.job_end(f"failed: {type(e).__name__}: {e}")
            raise

    def _checkpoint_path(self) -> Path:
        return self._out() / "checkpoint" / "server_state.pt"

    def _save_checkpoint(self, model: FLModel, controls: dict | None, all_sites: list[str]) -> None:
        """Everything the next round needs, written atomically: a restarted server resumes from here."""
        import io

        buf = io.BytesIO()
        torch.save({"params": {k: np.asarray(v) for k, v in model.params.items()}, "controls": controls,
                    "next_round": self.current_round + 1, "history": self.history, "best_metric": self._best_metric,
                    "misses": self._misses, "all_sites": all_sites, "dp_rounds": getattr(self, "_dp_rounds", 0)}, buf)
        atomic_write_bytes(self._checkpoint_path(), buf.getvalue())

    def _load_checkpoint(self, model: FLModel) -> dict[str, Any]:
        """The state a previous run left (empty when there is none: the job starts from the beginning)."""
        path = self._checkpoint_path()
        if not path.is_file():
            self.warning(f"resume requested but {path} does not exist; starting from round {self.start_round}")
            return {}
        state = torch.load(path, weights_only=False)  # written by this workflow only, in the server's own output folder
        model.params = state["params"]
        self.history = state["history"]
        self.history.setdefault("resumed_at_round", []).append(state["next_round"])
        self._dp_rounds = state["dp_rounds"]
        self.info(f"resumed from {path}: continuing at round {state['next_round']}")
        return state

    def _recorder(self, model: FLModel, state: dict[str, Any]):
        """The job's governance recorder (audit trail, registry, ledger), or None when governance is off."""
        if not self.governance:
            return None
        from monai_fl_ext.governance.events import GOVERNANCE_DIR, GovernanceRecorder

        key = self.audit_key_path or Path(self.engine.get_workspace().get_root_dir()) / "audit_signing_key.pem"
        recorder = GovernanceRecorder(self._out() / GOVERNANCE_DIR, job_id=self.fl_ctx.get_job_id(), key_path=key)
        if state:  # the trail of the interrupted run is verified on opening and continued
            recorder.note("job_resumed", round=state["next_round"], checkpoint=str(self._checkpoint_path()))
        else:
            recorder.job_start(self.history["config"], sites=sorted(c.name for c in self.engine.get_clients()), initial_params=model.params)
        return recorder

    def _record_round(self, record: dict[str, Any], ok: list[FLModel], mean_update: dict[str, np.ndarray] | None,
                      results: list[FLModel] | None = None) -> None:
        """The round's contributions, drops and budget refusals into the ledger and the audit trail."""
        if self._gov is None:
            return
        from monai_fl_ext.governance.ledger import contribution_stats

        rnd = self.current_round
        for r in ok:
            name = r.meta["client_name"]
            if self.shares_local_models:
                stats = contribution_stats(r.params, mean_update)  # no cosine when the round was not aggregated
            else:
                stats = {"reported_norm": record.get("update_norm", {}).get(name)}
            self._gov.update_accepted(rnd, name, {**stats, "samples": record["samples"].get(name), "local_steps": record["steps"].get(name),
                                                  "duration_s": r.meta.get("train_seconds"), "weight": record["weights"].get(name),
                                                  "privacy": record["privacy"].get(name)})
        rejected = record.get("sites_rejected", {})
        for name, why in record["sites_failed"].items():
            if name in rejected:
                self._gov.update_rejected(rnd, name, why)
            elif "privacy budget" in why:
                self._gov.budget_refusal(rnd, name, {"detail": why})
            else:
                self._gov.site_dropped(rnd, name, why)

    def _run_rounds(self, model: FLModel, state: dict[str, Any]) -> None:
        model.start_round, model.total_rounds = self.start_round, self.num_rounds
        controls: dict[str, np.ndarray] | None = state.get("controls")
        # FedOpt's optimizer state (momentum) is not checkpointed: after a resume it restarts from zero
        optimizer = ServerOptimizer(self.server_optimizer, self.server_lr, self.server_momentum) if self.algorithm == "fedopt" else None
        self._best_metric = state.get("best_metric", -math.inf)
        self._misses: dict[str, int] = dict(state.get("misses", {}))
        last_updates: dict[str, dict] = {}
        all_sites: list[str] = list(state.get("all_sites", []))
        for self.current_round in range(state.get("next_round", self.start_round), self.start_round + self.num_rounds):
            start = time.time()
            model.current_round = self.current_round
            model.meta = {}
            if self.algorithm == "fedprox":
                model.meta[FEDPROX_MU] = self.fedprox_mu
            if self.algorithm == "scaffold":
                controls = controls or {k: np.zeros_like(np.asarray(v), dtype=np.float32) for k, v in model.params.items()}
                model.meta[SCAFFOLD_CTRL_GLOBAL] = controls
            available = self.sample_clients()
            sites = self._schedule(available)
            if self._gov is not None:
                self._gov.round_start(self.current_round, sites)
                for site in sorted(set(sites) - set(all_sites)):
                    self._gov.site_joined(self.current_round, site)
            all_sites = sorted(set(all_sites) | set(sites))
            self.info(f"round {self.current_round}: training at {sites}")
            record, mean_update, ok = self._train_round(model, sites, start)
            record["scheduled"], record["available"] = sites, sorted(available)
            for site in record["sites_failed"]:
                self._misses[site] = self._misses.get(site, 0) + 1
            self._record_round(record, ok, mean_update)
            if mean_update is None:
                record["aggregated"] = False
                self.history["rounds"].append(record)
                if self.history["status"] != "running":
                    break
                self._flush()
                self._after_round(model, controls, all_sites)
                continue
            model_before = dict(model.params)
            metric = record["global_metrics"].get(self.key_metric)
            if metric is not None and metric > self._best_metric and self.current_round > self.start_round:
                self._best_metric = metric  # sites evaluated the model they received: last round's global
                self._save_state_dict(model_before, "best_global_model.pt")
                if self._gov is not None:
                    self._gov.model_saved(self.current_round, "best_global_model.pt", self._out() / "models" / "best_global_model.pt",
                                          record["global_metrics"], params=model_before)
            if optimizer is not None:
                new_params = optimizer.step(model.params, mean_update)
            else:
                new_params = {k: np.asarray(v) + np.asarray(mean_update[k]) if k in mean_update else v for k, v in model.params.items()}
            bad = sorted(k for k, v in new_params.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.all(np.isfinite(v)))
            if bad:  # never publish a corrupted model: the round is dropped and the previous global model stays
                self.warning(f"round {self.current_round}: the aggregate has non-finite values in {bad[:3]}; not applied")
                record.update(aggregated=False, not_applied=f"non-finite aggregate in {bad[:3]}")
                self.history["rounds"].append(record)
                self._flush()
                self._after_round(model, controls, all_sites)
                continue
            model.params = new_params
            if self.algorithm == "scaffold":
                for r in ok:
                    for k, v in r.meta.get(SCAFFOLD_CTRL_DIFF, {}).items():
                        controls[k] = controls[k] + np.asarray(v, dtype=np.float32) / max(len(sites), 1)
            model.params_type = ParamsType.FULL
            self.fl_ctx.set_prop("global_model", model, private=True, sticky=False)
            self.save_model(model)
            if self.shares_local_models:
                last_updates = {r.meta["client_name"]: (model_before, r.params) for r in ok}
            record["aggregated"] = True
            record["seconds"] = time.time() - start
            self.history["rounds"].append(record)
            self._log_round(record)
            if self._gov is not None:
                self._gov.aggregated(self.current_round, record, params=model.params)
            self._flush()
            self._after_round(model, controls, all_sites)
        self._finish(model, last_updates, all_sites)

    def _after_round(self, model: FLModel, controls: dict | None, all_sites: list[str]) -> None:
        self._save_checkpoint(model, controls, all_sites)
        if self.crash_after_round is not None and self.current_round == self.crash_after_round:
            if self._gov is not None:
                self._gov.note("server_crash_injected", round=self.current_round)
            raise RuntimeError(f"injected server crash after round {self.current_round} (fault drill)")

    def _train_round(self, model: FLModel, sites: list[str], start: float) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, list[FLModel]]:
        """Train at ``sites`` and aggregate: the round's record, the mean update, and the accepted results.

        A mean update of None means the round is not applied; a history status other than ``running``
        then ends the job (budget reached, too few sites).
        """
        results = self.broadcast_model(
            data=model, task_name="train", targets=sites, min_responses=self.min_clients,
            timeout=self.train_timeout, wait_time_after_min_received=self.wait_time_after_min_received, blocking=True,
        )
        ok, failed = self._split_results(sites, results)
        ok, rejected = self._screen(ok, model.params)
        record = self._round_record(ok, {**failed, **rejected}, time.time() - start)
        record["sites_rejected"] = rejected
        if not self._may_aggregate(results, ok, failed):
            return record, None, ok
        return record, self._aggregate_updates(ok, record), ok

    def _schedule(self, available: list[str]) -> list[str]:
        """The round's sites: all, or ``clients_per_round`` of them drawn with weight 1 / (1 + failed rounds)."""
        if not self.clients_per_round:
            return list(available)
        k = self.clients_per_round
        k = max(1, round(k * len(available))) if k < 1 else min(int(k), len(available))
        k = max(k, min(self.min_clients, len(available)))
        p = np.array([1.0 / (1 + self._misses.get(s, 0)) for s in available])
        rng = np.random.default_rng([0, self.current_round])  # reproducible draws for a given history of failures
        chosen = rng.choice(len(available), size=k, replace=False, p=p / p.sum())
        return sorted(available[i] for i in chosen)

    def _check_versions(self, result: FLModel) -> str | None:
        """Why a site's software must be refused (policy ``refuse``), or None; ``warn`` only logs."""
        from monai_fl_ext.site_checks import compare_versions

        if self.version_policy == "ignore" or not self.expected_versions:
            return None
        diffs = compare_versions(self.expected_versions, result.meta.get("versions") or {})
        if not diffs:
            return None
        message = "software differs from the job's: " + "; ".join(diffs)
        if self.version_policy == "warn":
            self.warning(f"round {self.current_round}: {result.meta.get('client_name')}: {message} (accepted: version_policy=warn)")
            return None
        return message

    def _screen(self, ok: list[FLModel], reference: dict[str, Any]) -> tuple[list[FLModel], dict[str, str]]:
        """Keep the updates that may touch the model: matching versions, keys, shapes, finite values, norm bounds."""
        from monai_fl_ext.robust import relative_norm_bounds, update_norm, validate_update

        rejected: dict[str, str] = {}
        for r in ok:
            name = r.meta["client_name"]
            why = self._check_versions(r) or validate_update(r.params, reference, self.max_update_norm)
            if why:
                rejected[name] = why
        if self.max_norm_factor > 0:
            norms = {r.meta["client_name"]: update_norm(r.params) for r in ok if r.meta["client_name"] not in rejected}
            for name, bound in relative_norm_bounds(norms, self.max_norm_factor).items():
                if norms[name] > bound:
                    rejected[name] = (f"update L2 norm {norms[name]:.4g} exceeds {self.max_norm_factor:g}x the median of the "
                                      f"other sites' norms ({bound:.4g})")
        for name, why in rejected.items():
            self.warning(f"round {self.current_round}: update from {name} rejected: {why}")
        return [r for r in ok if r.meta["client_name"] not in rejected], rejected

    def _may_aggregate(self, results: list[FLModel], ok: list[FLModel], failed: dict[str, str]) -> bool:
        """False, with the job's stop status set, when a site's budget is spent or too few sites answered."""
        exhausted = sorted(r.meta.get("client_name", "?") for r in results if r.meta.get("budget_exhausted"))
        if exhausted:
            self.warning(f"round {self.current_round}: privacy budget reached at {exhausted}; ending the job "
                         f"with the global model of the previous round")
            self.history["status"] = f"stopped at round {self.current_round}: privacy budget reached at {', '.join(exhausted)}"
            return False
        if len(ok) < self.min_clients:
            self.warning(f"round {self.current_round}: only {len(ok)} of min_clients={self.min_clients} answered; "
                         f"stopping with the global model of the previous round. Left out: {failed}")
            self.history["status"] = f"stopped at round {self.current_round}: too few sites"
            return False
        return True

    def _config(self) -> dict[str, Any]:
        keys = ("num_rounds", "min_clients", "algorithm", "fedprox_mu", "server_optimizer", "server_lr", "server_momentum",
                "weighting", "site_weights", "train_timeout", "wait_time_after_min_received", "key_metric",
                "client_dp_clip", "client_dp_noise", "client_dp_delta", "aggregator", "trim_fraction", "max_update_norm",
                "max_norm_factor", "version_policy", "clients_per_round", "expected_versions")
        return {k: getattr(self, k) for k in keys}

    def _split_results(self, sites: list[str], results: list[FLModel]) -> tuple[list[FLModel], dict[str, str]]:
        ok, failed = [], {}
        answered = set()
        for r in results:
            name = r.meta.get("client_name", "?")
            answered.add(name)
            if r.params:
                ok.append(r)
            else:
                failed[name] = r.meta.get("error", "empty result")
        for name in sites:
            if name not in answered:
                failed[name] = f"no answer within the round (timeout {self.train_timeout}s, wait after minimum {self.wait_time_after_min_received}s)"
        for name, why in failed.items():
            self.warning(f"round {self.current_round}: {name} left out: {why}")
        # arrival order varies from run to run; summing in site order makes the aggregate reproducible
        return sorted(ok, key=lambda r: r.meta.get("client_name", "?")), failed

    def _weight(self, result: FLModel) -> float:
        name = result.meta["client_name"]
        base = {"steps": float(result.meta.get(NUM_STEPS, 1.0)), "samples": float(result.meta.get("num_samples", 1.0)), "uniform": 1.0}[self.weighting]
        return base * float(self.site_weights.get(name, 1.0))

    def _aggregate_updates(self, ok: list[FLModel], record: dict[str, Any]) -> dict[str, np.ndarray]:
        from monai_fl_ext.robust import aggregate, flag_outliers

        record.update(drift_diagnostics({r.meta["client_name"]: r.params for r in ok}))
        record["suspicious"] = flag_outliers(record["update_norm"], record["cosine"], record["sites"])
        if self.client_dp_clip > 0:
            from monai_fl_ext.algorithms import dp_fedavg_mean
            from monai_fl_ext.privacy import client_level_epsilon

            if not hasattr(self, "_dp_rng"):
                self._dp_rng = np.random.default_rng()  # OS entropy: the noise must not be reproducible by anyone
            self._dp_rounds = getattr(self, "_dp_rounds", 0) + 1
            record["weights"] = {r.meta["client_name"]: 1.0 for r in ok}
            record["client_dp"] = {"clip": self.client_dp_clip, "noise_multiplier": self.client_dp_noise, "delta": self.client_dp_delta,
                                   "epsilon": client_level_epsilon(self.client_dp_noise, self._dp_rounds, self.client_dp_delta)
                                   if self.client_dp_noise > 0 else float("inf")}
            return dp_fedavg_mean([r.params for r in ok], self.client_dp_clip, self.client_dp_noise, self._dp_rng)
        if self.aggregator != "mean":
            return aggregate({r.meta["client_name"]: r.params for r in ok}, record["weights"], self.aggregator, self.trim_fraction)
        helper = WeightedAggregationHelper()
        for r in ok:
            helper.add(data=r.params, weight=record["weights"][r.meta["client_name"]], contributor_name=r.meta["client_name"],
                       contribution_round=self.current_round)
        return helper.get_result()

    def _round_record(self, ok: list[FLModel], failed: dict[str, str], seconds: float) -> dict[str, Any]:
        site_metrics = {r.meta["client_name"]: dict(r.metrics or {}) for r in ok}
        global_metrics = {}
        for key in sorted({k for m in site_metrics.values() for k in m}):
            global_metrics[key] = _mean([m.get(key) for m in site_metrics.values()])
        return {
            "round": self.current_round,
            "sites_ok": sorted(site_metrics),
            "sites_failed": failed,
            "weights": {r.meta["client_name"]: self._weight(r) for r in ok},
            "steps": {r.meta["client_name"]: int(r.meta.get(NUM_STEPS, 0)) for r in ok},
            "samples": {r.meta["client_name"]: int(r.meta.get("num_samples", 0)) for r in ok},
            "payload_bytes": {r.meta["client_name"]: int(r.meta.get("payload_bytes", 0)) for r in ok},
            "wire_bytes": {r.meta["client_name"]: int(r.meta.get("wire_bytes", r.meta.get("payload_bytes", 0))) for r in ok},
            "site_metrics": site_metrics,
            "per_label": {r.meta["client_name"]: r.meta.get("per_label", {}) for r in ok},
            "privacy": {r.meta["client_name"]: r.meta["privacy"] for r in ok if r.meta.get("privacy")},
            "global_metrics": global_metrics,
            "seconds": seconds,
        }

    def _log_round(self, record: dict[str, Any]) -> None:
        step = record["round"]
        for site, metrics in record["site_metrics"].items():
            for k, v in metrics.items():
                self._writer(site).add_scalar(k, v, step)
            self._writer(site).add_scalar("update_norm", record["update_norm"].get(site, 0.0), step)
            if site in record["privacy"]:
                self._writer(site).add_scalar("epsilon", record["privacy"][site]["epsilon"], step)
        for k, v in record["global_metrics"].items():
            if v is not None:
                self._writer(GLOBAL_MODEL).add_scalar(k, v, step)
        if record["privacy"]:  # sites hold disjoint patients: the job's guarantee is the worst site's
            record["max_epsilon"] = max(p["epsilon"] for p in record["privacy"].values())
            self._writer(GLOBAL_MODEL).add_scalar("max_epsilon", record["max_epsilon"], step)
        for w in self._writers.values():
            w.flush()
        self.info(f"round {step}: aggregated {record['sites_ok']} weights {record['weights']} "
                  f"global {self.key_metric} {record['global_metrics'].get(self.key_metric)}")

    def _flush(self) -> None:
        atomic_write_json(self._out() / "history.json", self.history)

    def _evaluate_everywhere(self, params: dict[str, Any], sites: list[str]) -> dict[str, dict[str, float]]:
        results = self.broadcast_model(
            data=FLModel(params=params, params_type=ParamsType.FULL), task_name="validate", targets=sites,
            min_responses=self.min_clients, timeout=self.train_timeout,
            wait_time_after_min_received=self.wait_time_after_min_received, blocking=True,
        )
        return {r.meta.get("client_name", "?"): dict(r.metrics or {}) for r in results if r.metrics}

    def _finish(self, model: FLModel, last_updates: dict[str, tuple], sites: list[str]) -> None:
        models = self._out() / "models"
        self._save_state_dict(model.params, "final_global_model.pt")
        if self._gov is not None:
            self._gov.model_saved(self.current_round, "final_global_model.pt", models / "final_global_model.pt", params=model.params)
        final = self._evaluate_everywhere(model.params, sites)
        final_metric = _mean([m.get(self.key_metric) for m in final.values()])
        self.history["final"] = {"site_metrics": final, "global_metrics": {self.key_metric: final_metric}}
        if final_metric is not None and final_metric >= self._best_metric:
            self._save_state_dict(model.params, "best_global_model.pt")
            if self._gov is not None:
                self._gov.model_saved(self.current_round, "best_global_model.pt", models / "best_global_model.pt",
                                      {self.key_metric: final_metric}, params=model.params)
        if self.cross_site_eval:
            matrix = {GLOBAL_MODEL: {s: m.get(self.key_metric) for s, m in final.items()}}
            for owner, (before, diff) in sorted(last_updates.items()):
                local = {k: np.asarray(v) + np.asarray(diff[k]) if k in diff else v for k, v in before.items()}
                matrix[owner] = {s: m.get(self.key_metric) for s, m in self._evaluate_everywhere(local, sites).items()}
            self.history["cross_site"] = {"metric": self.key_metric, "rows_model_columns_site": matrix}
            atomic_write_json(self._out() / "cross_site.json", self.history["cross_site"])
        if self.history["status"] == "running":
            self.history["status"] = "completed"
        self._flush()
        if self._gov is not None:
            self._gov.job_end(self.history["status"], self.history["final"]["global_metrics"])
        for w in self._writers.values():
            w.close()
        try:
            from monai_fl_ext.reporting import plot_drift, plot_privacy_spend

            plot_drift(self.history, self._out() / "drift.png")
            plot_privacy_spend(self.history, self._out() / "privacy.png")
            if self._gov is not None:
                from monai_fl_ext.governance.report import build_report

                build_report(self._out())
        except Exception as e:  # a plot or report must never fail a finished job
            self.warning(f"plot or audit report failed: {e}")
        self.info(f"finished: {self.history['status']}; outputs in {self._out()}")
