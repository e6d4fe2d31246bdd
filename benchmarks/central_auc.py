"""Test AUC of the central baseline on the synthetic demo cohort (the reference every FL run is compared to)."""

from __future__ import annotations

import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from benchmarks.common import BUNDLE, DEMO_COHORT, command, environment, sig

NAME = "central_auc"
DESCRIPTION = (
    "The central baseline in the demo setting: a synthetic ChestX-ray14 cohort "
    "(`SyntheticSpec(num_patients=--patients, image_size=64, num_hospitals=3, seed=0)`), split into 3 "
    "hospitals by a Dirichlet(0.5) partition (`monai_fl_ext.demo.prepare_synthetic`), trained with "
    "`monai_fl_ext.baseline.run_central` (the bundle's own ConfigWorkflow, `spatial_size` 64, `--epochs` "
    "epochs, CPU). Reports the best-validation checkpoint's test macro ROC-AUC (labels without both classes "
    "in the test set are left out), per site and per label, and wall times. Unlike the other benchmarks "
    "this is a quality number, not a timing: it is deterministic given the seed (up to CPU float "
    "non-determinism), while its `*_seconds` fields are as noisy as the machine."
)


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``central_auc`` (see :data:`DESCRIPTION`)."""
    from monai_fl_ext.baseline import run_central
    from monai_fl_ext.data.synthetic import SyntheticSpec
    from monai_fl_ext.demo import prepare_synthetic

    patients = args.patients or (120 if args.quick else 500)
    epochs = args.epochs or (1 if args.quick else 8)
    image_size = 64
    env = environment()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_central_auc_") as tmp:
        spec = SyntheticSpec(num_patients=patients, image_size=image_size, num_hospitals=3, seed=0)
        dataset_dir, datalist, partition = prepare_synthetic(Path(tmp), spec, 3, 0.5, progress=False)
        prepare_seconds = time.perf_counter() - start
        report = run_central(
            BUNDLE,
            dataset_dir,
            datalist,
            Path(tmp) / "central",
            epochs=epochs,
            partition_dir=partition,
            overrides={"spatial_size": [image_size, image_size]},
            progress=False,
        )
    wall = time.perf_counter() - start
    test, per_site = report["test"], report["per_site_test"]
    rows = [{"scope": "pooled test", "images": test["n"], "macro_auc": sig(test["macro_auc"])}]
    rows += [{"scope": site, "images": r["n"], "macro_auc": sig(r["macro_auc"])} for site, r in sorted(per_site.items())]
    per_label = []
    for label, auc in test["per_label_auc"].items():
        row = {"label": label, "pooled": sig(auc)}
        row.update({site: sig(r["per_label_auc"].get(label)) for site, r in sorted(per_site.items())})
        per_label.append(row)
    summary = {
        "test_macro_auc": sig(test["macro_auc"]),
        "best_val_auc": sig(report["best_val_auc"]),
        "best_val_epoch": report["best_val_epoch"],
        "epochs": epochs,
        "per_site_macro_auc": {site: sig(r["macro_auc"]) for site, r in sorted(per_site.items())},
        "train_seconds": sig(report["train_seconds"], 3),
        "wall_seconds": sig(wall, 3),
    }
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, args, epochs=epochs, patients=patients),
        "environment": env,
        "params": {
            "patients": patients,
            "image_size": image_size,
            **DEMO_COHORT,
            "epochs": epochs,
            "counts": report["counts"],
            "prepare_seconds": sig(prepare_seconds, 3),
            "quick": bool(args.quick),
        },
        "rows": rows,
        "tables": {"Test ROC-AUC per label (pooled and per site; empty = only one class present)": per_label},
        "summary": summary,
        "test": test,
        "per_site_test": per_site,
    }
