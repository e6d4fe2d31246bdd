"""Central baseline: train a bundle on the pooled training set and report test AUC.

This is the reference every federated run is compared against.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from monai_fl_ext.bundle import resolve_bundle, run_overrides, train_bundle
from monai_fl_ext.data.datalist import read_datalist, split_counts
from monai_fl_ext.evaluation import evaluate_checkpoint, finite_or_none
from monai_fl_ext.io import atomic_write_json, sha256_file

REPORT = "central_report.json"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(threads)``, restoring the previous count afterwards.

    Args:
        threads: torch intra-op threads; None leaves torch's setting alone.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_central(
    bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    out_dir: str | os.PathLike,
    epochs: int,
    partition_dir: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``bundle`` centrally and write ``out_dir/central_report.json``.

    Args:
        bundle: bundle name under ``bundles/`` or its path.
        dataset_dir: folder the datalist's image paths are relative to.
        datalist: pooled datalist JSON.
        out_dir: run folder (checkpoints in ``models/``, TensorBoard in ``eval/``, the report).
        epochs: training epochs.
        partition_dir: optional partition; its sites' test sets are also evaluated.
        overrides: extra bundle config overrides.
        progress: show progress bars.

    Returns:
        The report: test macro and per-label AUC of the best-validation checkpoint, per-site AUC,
        best validation AUC, counts, wall time.

    Raises:
        InputError: bad bundle, datalist or partition.
    """
    if epochs < 1:
        from monai_fl_ext.errors import InputError

        raise InputError(f"epochs must be >= 1, got {epochs}")
    bundle_root = resolve_bundle(bundle)
    data = read_datalist(datalist)
    out_dir = Path(out_dir)
    run = run_overrides(bundle_root, dataset_dir, datalist, out_dir, **{"train#trainer#max_epochs": epochs, **(overrides or {})})
    start = time.perf_counter()
    workflow = train_bundle(bundle_root, run, progress=progress)
    train_seconds = time.perf_counter() - start
    best = out_dir / "models" / "model.pt"
    checkpoint = best if best.exists() else out_dir / "models" / "model_final.pt"
    evaluation = evaluate_checkpoint(
        bundle_root, checkpoint, run, data["labels"], "test", Path(partition_dir) if partition_dir else None
    )
    evaluator = workflow.evaluator
    report = {
        "task": "central",
        "bundle": bundle_root.name,
        "datalist": str(datalist),
        "datalist_sha256": sha256_file(datalist),
        "counts": split_counts(data),
        "epochs": epochs,
        "overrides": {k: v for k, v in run.items() if k not in ("bundle_root", "ckpt_dir", "output_dir")},
        "checkpoint": str(checkpoint),
        "best_val_auc": finite_or_none(evaluator.state.best_metric) if evaluator is not None else None,
        "best_val_epoch": int(evaluator.state.best_metric_epoch) if evaluator is not None else None,
        "validation_history": workflow.validation_history,
        "test": evaluation["pooled"],
        "per_site_test": evaluation["per_site"],
        "train_seconds": round(train_seconds, 1),
    }
    atomic_write_json(out_dir / REPORT, report)
    return report
