"""FLARE Client API script: runs a bundle's ``FederatedBundleAlgo`` at one site.

FLARE's ``ScriptRunner`` starts this file at every site; it receives the global model, trains
locally, and sends back the weight diff with the iteration count (FLARE weights by it), the site's
validation metrics of the received global model and of its local model, and the algorithm's meta.
Errors are caught and reported as an empty result so the site stays in the job and the server can
aggregate the others (and log why this site was left out).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import nvflare.client as flare
import torch
from monai.fl.utils.constants import ExtraItems
from monai.fl.utils.exchange_object import ExchangeObject
from monai.fl.utils.constants import WeightType
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from monai_fl_ext.algo import FederatedBundleAlgo
from monai_fl_ext.algorithms import ALGORITHMS, make_local_term
from monai_fl_ext.faults import RoundFault, decide, poison_update
from monai_fl_ext.metrics import split_metrics
from monai_fl_ext.flare.secure import PAYLOAD, TASKS, SecureAggregationSite
from monai_fl_ext.privacy import BudgetExceeded, DPSettings
from monai_fl_ext.site_checks import DATA_POLICIES, check_site_data, software_versions

NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"  # nvflare.apis.fl_constant.FLMetaKey.NUM_STEPS_CURRENT_ROUND
logger = logging.getLogger("monai_fl_ext.client")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="monai_fl_ext FLARE client: trains a MONAI bundle at this site.")
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--dataset-dir", required=True, help="folder the datalist's image paths are relative to")
    p.add_argument("--datalist", required=True, help="this site's datalist JSON")
    p.add_argument("--run-dir", default="fl_site_outputs", help="site outputs: checkpoints, TensorBoard")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    p.add_argument("--fedprox-mu", type=float, default=0.01)
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON", help="bundle config override")
    p.add_argument("--privacy", default="", metavar="JSON", help="DP-SGD settings (monai_fl_ext.privacy.DPSettings fields)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads at this site (0: torch's default)")
    p.add_argument("--data-policy", choices=DATA_POLICIES, default="fail", help="bad items in the datalist: fail the site or skip them")
    p.add_argument("--check-images", action="store_true", help="also decode every image before joining (catches corrupt files)")
    p.add_argument("--faults", default="", metavar="JSON", help="this site's part of a fault plan (monai_fl_ext.faults), for drills")
    return p.parse_args(argv)


def site_overrides(args: argparse.Namespace, site: str) -> dict[str, Any]:
    run_dir = Path(args.run_dir).resolve() / site if not Path(args.run_dir).is_absolute() else Path(args.run_dir)
    overrides = {
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "datalist": str(Path(args.datalist).resolve()),
        "ckpt_dir": str(run_dir / "models"),
        "output_dir": str(run_dir / "eval"),
    }
    for item in args.override:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    return overrides


def _exchange(model: FLModel) -> ExchangeObject:
    return ExchangeObject(weights={k: torch.as_tensor(v) for k, v in model.params.items()}, weight_type=WeightType.WEIGHTS)


def train_round(algo: FederatedBundleAlgo, model: FLModel) -> FLModel:
    """Evaluate the received global model, train locally, and package the diff for the server."""
    data = _exchange(model)
    start = time.perf_counter()
    global_metrics = algo.evaluate(data).metrics
    algo.train(data, extra={"meta": {**(model.meta or {}), "current_round": model.current_round, "total_rounds": model.total_rounds}})
    update = algo.get_weights()
    local_metrics = algo.local_validation_metrics()
    params = {k: v.cpu() for k, v in update.weights.items() if k in model.params}
    global_scalars, global_per_label = split_metrics(global_metrics)
    local_scalars, local_per_label = split_metrics(local_metrics, "local_")
    meta = {
        NUM_STEPS: algo.executed_iterations(update),
        "num_samples": len(algo.train_workflow.train_dataset),
        "payload_bytes": int(sum(t.numel() * t.element_size() for t in params.values())),
        "train_seconds": time.perf_counter() - start,
        "per_label": {"global": global_per_label, "local": local_per_label},
        **algo.round_meta,
    }
    metrics = {**global_scalars, **local_scalars}
    return FLModel(params=params, params_type=ParamsType.DIFF, metrics=metrics, meta=meta)


def _start_site(args: argparse.Namespace, site: str, overrides: dict[str, Any]) -> FederatedBundleAlgo:
    """Check the site's data, then build and initialise its algo."""
    run_dir = Path(overrides["ckpt_dir"]).parent
    datalist, problems = check_site_data(overrides["datalist"], overrides["dataset_dir"], site, args.data_policy,
                                         decode=args.check_images, clean_path=run_dir / "datalist.checked.json")
    for problem in problems:
        logger.warning("skipped: %s", problem)
    overrides["datalist"] = str(datalist)
    algo = FederatedBundleAlgo(
        args.bundle, overrides, local_epochs=args.local_epochs, local_term=make_local_term(args.algorithm, args.fedprox_mu),
        privacy=DPSettings.from_dict(json.loads(args.privacy), where=site) if args.privacy else None,
        privacy_state=run_dir / "privacy_accountant.json",
    )
    algo.initialize(extra={ExtraItems.CLIENT_NAME: site, ExtraItems.APP_ROOT: ""})
    return algo


def _refuse_all_tasks(reason: str) -> None:
    while flare.is_running():
        if flare.receive() is None:
            break
        flare.send(FLModel(params={}, meta={"error": reason}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:  # simulated sites share one machine: oversubscribed threads slow every site down
        torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    overrides = site_overrides(args, site)
    try:
        algo = _start_site(args, site, overrides)
    except Exception as e:  # a site that cannot start answers every task with the reason; the others go on
        logger.exception("%s: cannot join", site)
        _refuse_all_tasks(f"{type(e).__name__}: {e}")
        return
    secure = SecureAggregationSite(site, flare.get_job_id())
    versions = software_versions(args.bundle)
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        try:
            if flare.get_task_name() in TASKS:
                flare.send(secure.handle(flare.get_task_name(), model))
            elif flare.is_train():
                masked = PAYLOAD in (model.meta or {})
                if masked:
                    secure.prepare_training(model)
                fault = decide(args.faults, model.current_round) if args.faults else RoundFault()
                time.sleep(fault.delay + fault.silent)  # silent: answers after the server's round timeout
                if fault.fail:
                    raise RuntimeError(f"injected failure at {site}, round {model.current_round}")
                result = train_round(algo, model)
                result.meta["versions"] = versions
                if fault.poison:
                    result.params = poison_update(result.params, fault.poison)
                flare.send(secure.mask(model, result) if masked else result)
            elif flare.is_evaluate():
                scalars, per_label = split_metrics(algo.evaluate(_exchange(model)).metrics)
                flare.send(FLModel(metrics=scalars, meta={"per_label": per_label}))
        except BudgetExceeded as e:  # never train past the budget: the server ends the job with the model so far
            logger.warning("%s: %s", site, e)
            flare.send(FLModel(params={}, meta={"error": f"privacy budget: {e}", "budget_exhausted": True}))
        except Exception as e:  # the site reports and stays in the job; the server logs the reason
            logger.exception("%s: task failed", site)
            flare.send(FLModel(params={}, meta={"error": f"{type(e).__name__}: {e}"}))
    algo.finalize()


if __name__ == "__main__":
    main()
