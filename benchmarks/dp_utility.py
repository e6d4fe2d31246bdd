"""Utility cost of DP-SGD: federated test AUC with DP-SGD at every site (target epsilon 8) vs without DP."""

from __future__ import annotations

import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from benchmarks.common import BUNDLE, DEMO_COHORT, command, demo_cohort, environment, fl_sizes, sig

NAME = "dp_utility"
TARGET_RATIO = 0.90
TARGET_EPSILON = 8.0
DELTA = 1e-5
FIGURE = f"{NAME}_curve.png"
DESCRIPTION = (
    "The privacy-utility target: FedAvg's test macro ROC-AUC with DP-SGD (Opacus, per-sample clipping norm 1.0) "
    f"at every site, calibrated to a target epsilon of {TARGET_EPSILON:g} (delta {DELTA:g}, max over sites) over the "
    "whole job, relative to the same job without DP (target ratio >= "
    f"{TARGET_RATIO}). Demo setting: a synthetic ChestX-ray14 cohort (`SyntheticSpec(num_patients=--patients, "
    "image_size=--image-size, num_hospitals=3, seed=0)`) split into 3 hospitals by a Dirichlet(0.5) label-skew "
    "partition (`monai_fl_ext.demo.prepare_synthetic(workdir, spec, 3, 0.5)`), then "
    "`monai_fl_ext.federated.run_privacy_sweep(FederatedJobSpec(bundle='chest_xray_classification', "
    "num_rounds=--rounds, local_epochs=--local-epochs, algorithm='fedavg', overrides={spatial_size, seed: 0, "
    f"norm: 'group'}}), datalist, noise_multipliers=--noise, target_epsilon={TARGET_EPSILON:g}, delta={DELTA:g})`: "
    "the non-private run, one run per fixed noise multiplier, and the run at the target epsilon, every one with "
    "the bundle's GroupNorm network (DP-SGD needs it; the non-private baseline uses it too, so the ratio isolates "
    "DP). Each run's best global checkpoint is evaluated on the pooled test set."
)


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``dp_utility`` (see :data:`DESCRIPTION`)."""
    from monai_fl_ext.federated import run_privacy_sweep
    from monai_fl_ext.flare.job import FederatedJobSpec
    from monai_fl_ext.io import read_json

    quick = bool(args.quick)
    patients, image_size, rounds, local_epochs = fl_sizes(args, quick_rounds=1, rounds=8)
    noise = list(getattr(args, "noise", None) or [])
    env = environment()
    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve() / NAME
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_dp_utility_")
        work = Path(tmp.name)
    start = time.perf_counter()
    figures: dict[str, str] = {}
    try:
        dataset_dir, datalist, partition_dir = demo_cohort(work, patients, image_size)
        prepare_seconds = time.perf_counter() - start
        out = work / "runs"
        job = FederatedJobSpec(
            bundle=BUNDLE, dataset_dir=str(dataset_dir), partition_dir=str(partition_dir), output_dir=str(out),
            num_rounds=rounds, local_epochs=local_epochs, algorithm="fedavg",
            overrides={"spatial_size": [image_size, image_size], "seed": 0, "norm": "group"},
        )
        sweep = run_privacy_sweep(job, datalist, noise_multipliers=noise, target_epsilon=TARGET_EPSILON, delta=DELTA,
                                  progress=False)
        manifest = read_json(partition_dir / "manifest.json")
        site_sizes = {s["name"]: s["items"] for s in manifest["sites"]}
        privacy_detail = {}
        for r in sweep:
            report = out / r["run"] / "fl_report.json"
            if report.is_file():
                privacy_detail[r["run"]] = read_json(report).get("privacy") or {}
        args.out.mkdir(parents=True, exist_ok=True)
        if (out / "privacy_utility.png").is_file():
            shutil.copyfile(out / "privacy_utility.png", args.out / FIGURE)
            figures["Privacy-utility: test macro AUC vs epsilon (max over sites); line: non-private"] = FIGURE
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - start

    base = next((r for r in sweep if r["run"] == "non-private"), None)
    base_auc = base["test_macro_auc"] if base else None
    rows = []
    for r in sweep:
        auc = r["test_macro_auc"]
        rows.append({
            "run": r["run"],
            "noise_multiplier": r["noise_multiplier"] or None,
            "epsilon": sig(r["epsilon"], 3) if r["epsilon"] is not None else None,
            "delta": r["delta"],
            "max_grad_norm": r["max_grad_norm"],
            "test_macro_auc": sig(auc),
            "ratio_to_non_private": sig(auc / base_auc) if auc is not None and base_auc else None,
            "status": r["status"],
        })
    target_name = f"target-eps-{TARGET_EPSILON:g}"
    target = next((r for r in rows if r["run"] == target_name), None)
    ratio = target["ratio_to_non_private"] if target else None
    summary = {
        "non_private_test_macro_auc": sig(base_auc),
        "dp_test_macro_auc_at_target": target["test_macro_auc"] if target else None,
        "epsilon_at_target": target["epsilon"] if target else None,
        "noise_multiplier_at_target": target["noise_multiplier"] if target else None,
        "auc_ratio_at_epsilon_8": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio is not None and ratio >= TARGET_RATIO),
        "rounds": rounds,
        "local_epochs": local_epochs,
        "wall_seconds": sig(wall, 3),
    }
    notes = [
        "epsilon = the largest final cumulative epsilon over the sites (each site holds disjoint patients, so the "
        "job's guarantee is the max); delta is per site.",
        "ratio_to_non_private = test macro AUC / the non-private FedAvg run's, both with the GroupNorm network, "
        "same partition, rounds, local epochs and seed.",
        "target-eps run: each site's noise multiplier is calibrated (by the package) so that its epsilon after all "
        "rounds reaches the target given its Poisson sampling rate (batch / site size) and step count; "
        "noise_multiplier lists the distinct per-site values.",
        "Quality numbers, deterministic given the seeds up to CPU float non-determinism, except that DP noise and "
        "Poisson sampling draw from OS entropy (not seeded), so DP rows vary from run to run.",
    ]
    if quick:
        notes.append("Quick mode: a tiny cohort and one round; the AUCs are a smoke test, not a result.")
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, args, patients=patients, image_size=image_size, rounds=rounds,
                           local_epochs=local_epochs, noise=noise or None),
        "environment": env,
        "params": {
            "patients": patients,
            "image_size": image_size,
            **DEMO_COHORT,
            "algorithm": "fedavg",
            "rounds": rounds,
            "local_epochs": local_epochs,
            "norm": "group",
            "noise_multipliers": noise,
            "target_epsilon": TARGET_EPSILON,
            "delta": DELTA,
            "max_grad_norm": 1.0,
            "site_sizes": site_sizes,
            "prepare_seconds": sig(prepare_seconds, 3),
            "quick": quick,
        },
        "rows": rows,
        "figures": figures,
        "summary": summary,
        "notes": notes,
        "privacy": privacy_detail,
        "sweep": sweep,
    }
