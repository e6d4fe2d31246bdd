"""Robustness of the server's aggregation: update validation, robust aggregators, outlier flags (pure numpy).

Every update is validated before it can touch the global model; a rejected update is reported with
the reason and the round goes on with the rest. The aggregators here need each site's update, so they
apply to the non-secure path only; under secure aggregation the defence is the sites' own norm bound
(see docs/robustness.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

AGGREGATORS = ("mean", "median", "trimmed_mean", "norm_clip")


def is_float(value: Any) -> bool:
    """Whether ``value`` holds floating-point numbers (integer buffers are not averaged or clipped)."""
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def update_norm(update: Mapping[str, Any]) -> float:
    """L2 norm over the floating-point entries of an update."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in update.values() if is_float(v))))


def validate_update(update: Mapping[str, Any], reference: Mapping[str, Any], max_norm: float | None = None) -> str | None:
    """Why ``update`` must not touch a model shaped like ``reference``, or None when it may.

    Checks, in order: the same keys, the same shapes, numeric and finite values, and (when given) an L2
    norm of at most ``max_norm``.
    """
    missing, unexpected = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or unexpected:
        return f"keys differ from the global model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
    shapes = {k: (tuple(np.shape(update[k])), tuple(np.shape(reference[k]))) for k in reference}
    wrong = {k: s for k, s in shapes.items() if s[0] != s[1]}
    if wrong:
        k, (got, want) = next(iter(sorted(wrong.items())))
        return f"shape of {k} is {got}, the global model's is {want} ({len(wrong)} key(s) differ)"
    for k in sorted(update):
        arr = np.asarray(update[k])
        if not np.issubdtype(arr.dtype, np.number):
            return f"{k} is not numeric (dtype {arr.dtype})"
        if is_float(arr) and not np.all(np.isfinite(arr)):
            return f"{k} has {int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))} non-finite value(s)"
    if max_norm is not None:
        norm = update_norm(update)
        if norm > max_norm:
            return f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None


def relative_norm_bounds(norms: Mapping[str, float], factor: float) -> dict[str, float]:
    """Each site's bound: ``factor`` times the median norm of the *other* sites (a poisoned site cannot raise its own bar)."""
    out = {}
    for site in norms:
        others = [n for s, n in norms.items() if s != site and np.isfinite(n)]
        out[site] = factor * float(np.median(others)) if others else float("inf")
    return out


def aggregate(updates: Mapping[str, Mapping[str, Any]], weights: Mapping[str, float], method: str = "mean",
              trim_fraction: float = 0.1, clip_factor: float = 2.0) -> dict[str, np.ndarray]:
    """Combine site updates with ``method``.

    Args:
        updates: ``{site: {param: diff}}``, already validated.
        weights: ``{site: weight}`` for ``mean`` and ``norm_clip``.
        method: ``mean`` (weighted), ``median`` (coordinate-wise), ``trimmed_mean`` (coordinate-wise, dropping
            ``trim_fraction`` of the sites at each end), ``norm_clip`` (each update scaled down to at most
            ``clip_factor`` times the median update norm, then the weighted mean).
        trim_fraction: fraction of sites trimmed at each end (at least one site is kept).
        clip_factor: ``norm_clip`` bound relative to the median norm.

    Returns:
        The aggregate update, each entry in the dtype of the first site's.

    Raises:
        ValueError: an unknown method, no updates, or non-positive total weight.
    """
    if method not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {method!r}")
    sites = sorted(updates)
    if not sites:
        raise ValueError("no updates to aggregate")
    if method == "norm_clip":
        norms = {s: update_norm(updates[s]) for s in sites}
        bound = clip_factor * float(np.median(list(norms.values())))
        updates = {s: {k: np.asarray(v) * (min(1.0, bound / norms[s]) if norms[s] > 0 and is_float(v) else 1.0)
                       for k, v in updates[s].items()} for s in sites}
    w = np.array([float(weights.get(s, 1.0)) for s in sites])
    if method in ("mean", "norm_clip") and not w.sum() > 0:
        raise ValueError(f"total aggregation weight must be positive, got {w.sum()}")
    out = {}
    for key in updates[sites[0]]:
        stack = np.stack([np.asarray(updates[s][key], dtype=np.float64) for s in sites])
        if method == "median":
            value = np.median(stack, axis=0)
        elif method == "trimmed_mean":
            k = min(int(trim_fraction * len(sites)), (len(sites) - 1) // 2)
            value = np.sort(stack, axis=0)[k:len(sites) - k].mean(axis=0)
        else:
            value = np.tensordot(w / w.sum(), stack, axes=1)
        out[key] = value.astype(np.asarray(updates[sites[0]][key]).dtype)
    return out


def flag_outliers(norms: Mapping[str, float], cosine: list[list[float]] | None = None, sites: list[str] | None = None,
                  z_threshold: float = 3.5, min_mean_cosine: float = -0.1) -> dict[str, list[str]]:
    """Sites whose update looks unlike the others this round: ``{site: [reasons]}`` (flags only; nothing is dropped).

    Args:
        norms: update L2 norm per site.
        cosine: pairwise cosine matrix in ``sites`` order (from :func:`monai_fl_ext.diagnostics.drift_diagnostics`).
        sites: the order of ``cosine``'s rows.
        z_threshold: robust z-score (median and MAD) of the norm above which a site is flagged; needs 3+ sites.
        min_mean_cosine: a site whose mean cosine to the others is below this is flagged.
    """
    flags: dict[str, list[str]] = {}
    names = sorted(norms)
    values = np.array([norms[s] for s in names], dtype=np.float64)
    if len(names) >= 3:
        med = float(np.median(values))
        mad = float(np.median(np.abs(values - med)))
        scale = 1.4826 * mad if mad > 0 else max(1e-12, 1e-3 * abs(med))
        for s, v in zip(names, values):
            z = (v - med) / scale
            if abs(z) > z_threshold:
                flags.setdefault(s, []).append(f"update norm {v:.4g} is {z:+.1f} robust SDs from the median {med:.4g}")
    if cosine is not None and sites is not None and len(sites) >= 3:
        c = np.asarray(cosine, dtype=np.float64)
        for i, s in enumerate(sites):
            mean_cos = float((c[i].sum() - c[i, i]) / (len(sites) - 1))
            if mean_cos < min_mean_cosine:
                flags.setdefault(s, []).append(f"mean cosine to the other sites' updates is {mean_cos:.3f}")
    return flags
