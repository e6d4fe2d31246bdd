"""Multi-label ROC-AUC that stays defined when a label has no positives in the evaluated set.

MONAI's macro ROC-AUC is the plain mean over labels, so one label without positives (common at a
small hospital's validation set) turns the whole metric into NaN and breaks best-model selection
and federated metric reporting. Here undefined labels are left out of the macro mean and reported
as NaN per label.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import ROCAUCMetric
from monai.metrics.rocauc import compute_roc_auc


def per_label_auc(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> list[float]:
    """ROC-AUC per label column; NaN where a column has only one class.

    Args:
        probs: (N, K) predicted probabilities (or any score monotone in them).
        labels: (N, K) 0/1 targets.

    Returns:
        K floats.
    """
    probs_t, labels_t = torch.as_tensor(probs, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y values can not be all 0 or 1" for undefined labels
        # MONAI squeezes a single label column and then returns a scalar instead of a one-element list
        return [float(v) for v in np.atleast_1d(compute_roc_auc(probs_t, labels_t, average="none"))]


def split_metrics(metrics: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """Scalar metrics and per-label dicts of an engine's ``state.metrics``, JSON-ready (NaN becomes None in dicts).

    Ignite also copies each entry of a dict-valued metric (``{label: auc}``) to the top level; those
    copies are dropped from the scalars. Non-finite scalars are kept out.
    """
    per_label = {k: {n: (float(x) if math.isfinite(x) else None) for n, x in v.items()} for k, v in metrics.items() if isinstance(v, Mapping)}
    nested = {n for v in per_label.values() for n in v}
    scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()
               if k not in nested and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return scalars, per_label


def macro_auc(per_label: Sequence[float]) -> float:
    """Mean of the defined per-label AUCs (NaN only if none is defined)."""
    values = np.asarray(per_label, dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


class MacroROCAUCMetric(ROCAUCMetric):
    """:class:`monai.metrics.ROCAUCMetric` whose macro average skips labels without both classes.

    Args:
        average: ``"macro"`` or ``"none"`` (per label).
        labels: label names; with ``"none"`` the result is then ``{name: auc}``, which logs and saves on one line.
    """

    def __init__(self, average: str = "macro", labels: Sequence[str] | None = None) -> None:
        super().__init__(average=average)
        self.labels = list(labels) if labels is not None else None

    def aggregate(self, average: str | None = None) -> float | np.ndarray | dict[str, float]:  # type: ignore[override]
        y_pred, y = self.get_buffer()
        per_label = per_label_auc(y_pred, y)
        if (average or self.average) != "none":
            return macro_auc(per_label)
        # not a list: ignite's metric handler keeps only the first element of a list
        return dict(zip(self.labels, per_label)) if self.labels else np.asarray(per_label)


class MacroROCAUC(IgniteMetricHandler):
    """Ignite handler for :class:`MacroROCAUCMetric`; use it where a bundle would use ``monai.handlers.ROCAUC``.

    Args:
        average: ``"macro"`` (NaN-skipping mean) or ``"none"`` (per label).
        labels: label names, to report ``"none"`` as ``{name: auc}``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``, e.g. ``from_engine(["pred", "label"])``.
    """

    def __init__(self, average: str = "macro", labels: Sequence[str] | None = None, output_transform=lambda x: x) -> None:
        super().__init__(
            metric_fn=MacroROCAUCMetric(average=average, labels=labels), output_transform=output_transform, save_details=False
        )
