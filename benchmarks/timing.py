"""Interleaved, repeated timing: the one way every benchmark here measures speed.

The machines these run on are shared and noisy, so absolute timings mean little. Variants are
timed side by side in the same process: every round runs each variant once, the order rotating
from round to round so none always runs first or right after another, and results are medians.
Ratios are taken per round (both variants ran moments apart under the same load) and the median
of those paired ratios is reported.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass
class Timings:
    """Seconds per call of each variant, one sample per round (rounds in order)."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        """Median seconds of one call of ``name``."""
        return statistics.median(self.samples[name])

    def spread(self, name: str) -> float:
        """(max - min) / median of ``name``'s samples: a crude noise indicator (0 = perfectly stable)."""
        s = self.samples[name]
        return (max(s) - min(s)) / statistics.median(s)

    def paired_ratio(self, numerator: str, denominator: str) -> float:
        """Median over rounds of ``time(numerator) / time(denominator)`` measured in the same round."""
        pairs = zip(self.samples[numerator], self.samples[denominator])
        return statistics.median(a / b for a, b in pairs)


def interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int | Mapping[str, int] = 1,
    sync: Callable[[], object] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Time each variant ``repeats`` times, interleaved, after untimed warm-up calls.

    Args:
        variants: name -> zero-argument callable doing one unit of work (an epoch, a train step...).
        repeats: timed rounds; each round calls every variant once.
        warmup: untimed calls per variant before timing (an int for all, or a per-name mapping).
        sync: called before starting and before stopping the clock (e.g. ``torch.cuda.synchronize``).
        timer: clock.

    Returns:
        The samples; use :meth:`Timings.median` and :meth:`Timings.paired_ratio`.

    Raises:
        ValueError: no variants, or ``repeats`` < 1.
    """
    names = list(variants)
    if not names or repeats < 1:
        raise ValueError(f"need at least one variant and repeats >= 1 (got {len(names)} variants, repeats={repeats})")
    warm = {n: (warmup.get(n, 1) if isinstance(warmup, Mapping) else warmup) for n in names}
    for step in range(max(warm.values(), default=0)):
        for n in names:
            if step < warm[n]:
                variants[n]()
    timings = Timings({n: [] for n in names})
    for r in range(repeats):
        k = r % len(names)
        order = names[k:] + names[:k]
        if (r // len(names)) % 2:  # after a full rotation, run the rotations backwards
            order.reverse()
        for n in order:
            gc.collect()
            if sync:
                sync()
            start = timer()
            variants[n]()
            if sync:
                sync()
            timings.samples[n].append(timer() - start)
    return timings


def with_threads(fn: Callable[[], object], threads: int) -> Callable[[], object]:
    """``fn`` run with ``torch.set_num_threads(threads)``, restoring the previous count afterwards."""
    from monai_fl_ext.baseline import torch_threads

    def run() -> object:
        with torch_threads(threads):
            return fn()

    return run
