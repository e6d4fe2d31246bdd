"""Test AUC of federated training vs the central baseline on the synthetic demo cohort (the project's utility target)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import BUNDLE, DEMO_COHORT, benchmark_workdir, command, demo_cohort, environment, fl_sizes, sig

NAME = "fl_vs_central"
TARGET_RATIO = 0.98
FIGURE = f"{NAME}_convergence.png"
COMPARE_MD = f"{NAME}_compare.md"
DESCRIPTION = (
    "The utility target: the federated global model's test macro ROC-AUC relative to central training on the "
    "same data and the same total number of local epochs (target ratio >= "
    f"{TARGET_RATIO}). Demo setting: a synthetic ChestX-ray14 cohort (`SyntheticSpec(num_patients=--patients, "
    "image_size=--image-size, num_hospitals=3, seed=0)`) split into 3 hospitals by a Dirichlet(0.5) label-skew "
    "partition (`monai_fl_ext.demo.prepare_synthetic(workdir, spec, 3, 0.5)`), then "
    "`monai_fl_ext.federated.run_compare(FederatedJobSpec(bundle='chest_xray_classification', num_rounds=--rounds, "
    "local_epochs=--local-epochs, overrides={spatial_size, seed: 0}), datalist, --algorithms)`: the central "
    "baseline trains rounds x local_epochs epochs on the pooled training set, each algorithm runs in FLARE's "
    "simulator (one process per site, site threads = cores / sites), and every run's best checkpoint (central: "
    "best validation epoch; FL: best global validation AUC over rounds) is evaluated on the pooled test set and "
    "on each hospital's test set. A quality number, deterministic given the seeds up to CPU float "
    "non-determinism; the `wall_s` column is as noisy as the shared machine."
)


@contextlib.contextmanager
def _timed_runs(walls: dict[str, float]) -> Iterator[None]:
    """Record the wall time of each run of ``run_compare`` (it calls these two by their module-global names)."""
    import monai_fl_ext.federated as fed

    central, federated = fed.run_central, fed.run_federated

    def timed_central(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return central(*a, **k)
        finally:
            walls["central"] = time.perf_counter() - start

    def timed_federated(spec: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return federated(spec, *a, **k)
        finally:
            walls[spec.algorithm] = time.perf_counter() - start

    fed.run_central, fed.run_federated = timed_central, timed_federated
    try:
        yield
    finally:
        fed.run_central, fed.run_federated = central, federated


def _convergence_table(out: Path, algorithms: list[str], local_epochs: int) -> list[dict[str, Any]]:
    """Validation macro AUC after each epoch of training: central per epoch, FL global model per round."""
    from monai_fl_ext.federated import FL_REPORT, validation_curve
    from monai_fl_ext.io import read_json

    curves: dict[str, dict[int, float]] = {}
    central = out / "central" / "central_report.json"
    if central.is_file():
        curves["central"] = {int(h["epoch"]): h.get("val_auc") for h in read_json(central).get("validation_history", [])}
    for alg in algorithms:
        report = out / alg / FL_REPORT
        if report.is_file():
            curves[alg] = {int(x): y for x, y in validation_curve(read_json(report))}
    epochs = sorted({e for c in curves.values() for e in c})
    return [{"epochs_trained": e, **{name: sig(c.get(e)) for name, c in curves.items()}} for e in epochs]


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``fl_vs_central`` (see :data:`DESCRIPTION`)."""
    from monai_fl_ext.federated import run_compare
    from monai_fl_ext.flare.job import FederatedJobSpec
    from monai_fl_ext.io import read_json

    quick = bool(args.quick)
    patients, image_size, rounds, local_epochs = fl_sizes(args, quick_rounds=2, rounds=8)
    algorithms = [a.strip() for a in (args.algorithms or ("fedavg" if quick else "fedavg,fedprox,scaffold")).split(",") if a.strip()]
    env = environment()
    work, tmp = benchmark_workdir(args, NAME)
    walls: dict[str, float] = {}
    start = time.perf_counter()
    try:
        dataset_dir, datalist, partition_dir = demo_cohort(work, patients, image_size)
        prepare_seconds = time.perf_counter() - start
        out = work / "runs"
        job = FederatedJobSpec(
            bundle=BUNDLE, dataset_dir=str(dataset_dir), partition_dir=str(partition_dir), output_dir=str(out),
            num_rounds=rounds, local_epochs=local_epochs, overrides={"spatial_size": [image_size, image_size], "seed": 0},
        )
        site_threads = max(1, (os.cpu_count() or 1) // len(job.sites()))  # FederatedJobSpec's default
        with _timed_runs(walls):
            compare = run_compare(job, datalist, algorithms, progress=False)
        manifest = read_json(partition_dir / "manifest.json")
        site_sizes = {s["name"]: s["items"] for s in manifest["sites"]}
        convergence = _convergence_table(out, algorithms, local_epochs)
        statuses = {alg: read_json(out / alg / "fl_report.json")["status"] for alg in algorithms}
        args.out.mkdir(parents=True, exist_ok=True)
        figures = {}
        if (out / "convergence.png").is_file():
            shutil.copyfile(out / "convergence.png", args.out / FIGURE)
            figures["Convergence: validation macro AUC by epochs trained (dashed line: central test AUC)"] = FIGURE
        if (out / "compare.md").is_file():
            (args.out / COMPARE_MD).write_text((out / "compare.md").read_text().replace("(convergence.png)", f"({FIGURE})"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - start

    central_auc = compare["central_test_macro_auc"]
    sites = sorted(compare["central_per_site_test_macro_auc"])
    rows = [{"run": "central", "test_macro_auc": sig(central_auc), "ratio_to_central": 1.0,
             **{s: sig(compare["central_per_site_test_macro_auc"].get(s)) for s in sites},
             "status": "completed", "wall_s": sig(walls.get("central"), 3)}]
    for alg, r in compare["federated"].items():
        rows.append({"run": f"FL {alg}", "test_macro_auc": sig(r["test_macro_auc"]), "ratio_to_central": sig(r["ratio_to_central"]),
                     **{s: sig(r["per_site_test_macro_auc"].get(s)) for s in sites}, "status": statuses.get(alg, r["status"]),
                     "wall_s": sig(walls.get(alg), 3)})
    best = compare["best_algorithm"]
    best_ratio = compare["federated"][best]["ratio_to_central"] if best else None
    summary = {
        "central_test_macro_auc": sig(central_auc),
        "best_algorithm": best,
        "best_test_macro_auc": sig(compare["federated"][best]["test_macro_auc"]) if best else None,
        "best_ratio_to_central": sig(best_ratio),
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(best_ratio is not None and best_ratio >= TARGET_RATIO),
        **{f"ratio_{alg}": sig(r["ratio_to_central"]) for alg, r in compare["federated"].items()},
        "rounds": rounds,
        "local_epochs": local_epochs,
        "total_epochs": compare["epochs"],
        "wall_seconds": sig(wall, 3),
    }
    notes = [
        "ratio_to_central = FL test macro AUC / central test macro AUC on the same pooled test set (labels without "
        "both classes in a test set are left out of its macro AUC); per-site columns are each hospital's own test set.",
        "FL checkpoint: the global model with the best mean site validation AUC over rounds (or the final one if "
        "better); central: the best validation epoch. Both saw rounds x local_epochs epochs of the training data.",
        "Validation curves are not on the same data: central is scored on the pooled validation set, FL on each "
        "site's small validation set (mean of the per-site macro AUCs, which leave out labels absent from a site), "
        "so compare their shapes, and compare the runs on the test columns.",
        f"Sites run as separate processes with {site_threads} torch thread(s) each (the default for simulation: "
        f"cores / sites); the central run uses this process's {env['torch_threads']} thread(s). wall_s includes "
        "FLARE start-up and the test evaluation.",
    ]
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, args, patients=patients, image_size=image_size, rounds=rounds,
                           local_epochs=local_epochs, algorithms=",".join(algorithms)),
        "environment": env,
        "params": {
            "patients": patients,
            "image_size": image_size,
            **DEMO_COHORT,
            "rounds": rounds,
            "local_epochs": local_epochs,
            "algorithms": algorithms,
            "site_threads": site_threads,
            "site_sizes": site_sizes,
            "prepare_seconds": sig(prepare_seconds, 3),
            "quick": quick,
        },
        "rows": rows,
        "tables": {"Validation macro AUC by epochs trained (central: pooled validation set after each epoch; FL: mean of "
                   "the sites' validation AUCs of the global model after each round)": convergence},
        "figures": figures,
        "summary": summary,
        "notes": notes,
        "compare": compare,
    }
