"""AUC reports of a trained checkpoint: pooled test set, per label and per site."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_fl_ext.bundle import predict
from monai_fl_ext.metrics import macro_auc, per_label_auc
from monai_fl_ext.partition import load_manifest


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def auc_report(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """Macro and per-label ROC-AUC of (N, K) probabilities against (N, K) multi-hot labels.

    Returns:
        ``{"n": N, "macro_auc": float | None, "per_label_auc": {name: float | None}}``; a label
        with only one class in ``labels`` has no AUC (null) and is left out of the macro mean.
    """
    per_label = per_label_auc(probs, labels)
    return {
        "n": int(len(labels)),
        "macro_auc": finite_or_none(macro_auc(per_label)),
        "per_label_auc": {name: finite_or_none(v) for name, v in zip(label_names, per_label)},
    }


def evaluate_checkpoint(
    bundle_root: Path,
    checkpoint: Path,
    overrides: Mapping[str, Any],
    label_names: Sequence[str],
    split: str = "test",
    partition_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` of the pooled datalist and, given a partition, of each site's.

    Returns:
        ``{"pooled": auc_report, "per_site": {site: auc_report}}`` (``per_site`` empty without a partition).
    """
    probs, labels = predict(bundle_root, checkpoint, overrides, split)
    result: dict[str, Any] = {"split": split, "pooled": auc_report(probs, labels, label_names), "per_site": {}}
    if partition_dir is not None:
        for site in load_manifest(partition_dir)["sites"]:
            site_overrides = {**overrides, "datalist": str((Path(partition_dir) / site["file"]).resolve())}
            if site["items"].get(split, 0) == 0:
                continue
            p, y = predict(bundle_root, checkpoint, site_overrides, split)
            result["per_site"][site["name"]] = auc_report(p, y, label_names)
    return result
