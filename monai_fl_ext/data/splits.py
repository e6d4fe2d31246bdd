"""Patient-wise splits: every image of a patient lands in the same split.

Splitting images instead of patients leaks a patient's anatomy from training into test and
inflates every metric, so all loaders split by patient id with these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from monai_fl_ext.data.datalist import SPLITS
from monai_fl_ext.errors import InputError

_TOLERANCE = 1e-6


def _shuffled_unique(patient_ids: Iterable[str], seed: int) -> list[str]:
    """Sorted distinct ids, permuted by ``numpy.random.default_rng(seed)`` (independent of input order)."""
    unique = sorted({str(p) for p in patient_ids})
    order = np.random.default_rng(seed).permutation(len(unique))
    return [unique[i] for i in order]


def check_fractions(fractions: Sequence[float], name: str = "fractions") -> tuple[float, ...]:
    """Check split fractions: finite, non-negative and summing to 1 (within 1e-6).

    Args:
        fractions: one fraction per split.
        name: the parameter name used in error messages.

    Returns:
        The fractions as a tuple of floats.

    Raises:
        InputError: naming ``name`` when a fraction is negative or not finite, or the sum is not 1.
    """
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name} must be numbers, got {fractions!r}") from e
    if any(not math.isfinite(f) or f < 0 for f in values):
        raise InputError(f"{name} must be finite and non-negative, got {values}")
    if abs(sum(values) - 1.0) > _TOLERANCE:
        raise InputError(f"{name} must sum to 1, got {values} (sum {sum(values):.6g})")
    return values


def patient_split(
    patient_ids: Iterable[str], fractions: Sequence[float] = (0.7, 0.1, 0.2), seed: int = 0
) -> dict[str, str]:
    """Assign each distinct patient to "training", "validation" or "test".

    The distinct ids are sorted, permuted with ``numpy.random.default_rng(seed)`` and cut at the
    cumulative fractions (rounded to whole patients), so the result depends only on the set of ids,
    the fractions and the seed.

    Args:
        patient_ids: patient ids (repeats allowed: one per image).
        fractions: fractions of patients for training, validation and test; non-negative, summing to 1.
        seed: random seed.

    Returns:
        ``{patient_id: split_name}`` for every distinct id.

    Raises:
        InputError: naming ``fractions`` when there are not three of them, or they are invalid.
    """
    if len(fractions) != len(SPLITS):
        raise InputError(f"fractions needs {len(SPLITS)} values for {SPLITS}, got {tuple(fractions)}")
    values = check_fractions(fractions, "fractions")
    ids = _shuffled_unique(patient_ids, seed)
    bounds = [int(round(c * len(ids))) for c in np.cumsum(values)]
    bounds[-1] = len(ids)
    assignment: dict[str, str] = {}
    start = 0
    for split, stop in zip(SPLITS, bounds):
        for pid in ids[start:stop]:
            assignment[pid] = split
        start = max(start, stop)
    return assignment


def holdout_patients(patient_ids: Iterable[str], fraction: float, seed: int = 0) -> set[str]:
    """Pick ``round(fraction * n)`` of the ``n`` distinct patients, e.g. validation out of train_val.

    Args:
        patient_ids: patient ids (repeats allowed).
        fraction: share of distinct patients to hold out, in [0, 1].
        seed: random seed (same permutation rule as :func:`patient_split`).

    Returns:
        The held-out patient ids.

    Raises:
        InputError: naming ``fraction`` when it is outside [0, 1] or not a finite number.
    """
    try:
        value = float(fraction)
    except (TypeError, ValueError) as e:
        raise InputError(f"fraction must be a number, got {fraction!r}") from e
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InputError(f"fraction must be in [0, 1], got {fraction!r}")
    ids = _shuffled_unique(patient_ids, seed)
    return set(ids[: int(round(value * len(ids)))])


def check_patients_disjoint(datalist: Mapping[str, Any], source: str = "datalist") -> None:
    """Check that no patient appears in two splits of a datalist.

    Items without a ``"patient"`` key are ignored.

    Args:
        datalist: a datalist dict with "training"/"validation"/"test" item lists.
        source: text naming the datalist in error messages.

    Raises:
        InputError: naming the first patient found in two splits, and the splits.
    """
    seen: dict[str, str] = {}
    for split in SPLITS:
        for item in datalist.get(split, []):
            if "patient" not in item:
                continue
            pid = str(item["patient"])
            other = seen.setdefault(pid, split)
            if other != split:
                raise InputError(f"{source}: patient {pid!r} is in both '{other}' and '{split}'")
