"""Fixed-point encoding of weighted float updates in the ring Z_(2^bits), and the exact error bound of decoding.

A site's contribution is the vector ``[w, w * clip(x, -c, c)]`` where ``w = weight / max_weight`` lies in
(0, 1]. Each element is rounded to an integer at its own scale and reduced modulo ``2^bits``. Every
element of one site is at most ``2^(bits-1) / num_sites`` in magnitude, so the sum of all ``num_sites``
contributions stays inside ``(-2^(bits-1), 2^(bits-1))``: the modular sum, read as a signed integer, is
the true integer sum and cannot overflow. Pairwise masks then cancel exactly in that modular sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BIT_WIDTHS = (32, 64)


@dataclass(frozen=True)
class FixedPoint:
    """The encoding every site and the server agree on for one round.

    Args:
        num_sites: sites that may contribute (the bound on how many encoded vectors are summed).
        bits: ring bit width, 32 or 64; 32 sends as many bytes as float32, 64 is effectively exact.
        clip_range: update coordinates are clipped to ``[-clip_range, clip_range]`` before encoding.
        max_weight: the largest aggregation weight a site may send (weights are divided by it).
    """

    num_sites: int
    bits: int = 32
    clip_range: float = 8.0
    max_weight: float = 4096.0

    def __post_init__(self) -> None:
        if self.bits not in BIT_WIDTHS:
            raise ValueError(f"secure aggregation bits must be one of {BIT_WIDTHS}, got {self.bits}")
        if self.num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {self.num_sites}")
        if not self.clip_range > 0 or not self.max_weight > 0:
            raise ValueError(f"clip_range and max_weight must be positive, got {self.clip_range}, {self.max_weight}")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.bits == 32 else np.uint64)

    @property
    def _half(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def weight_scale(self) -> float:
        """Integer units per unit of normalised weight: ``num_sites`` weights of at most 1 fit in half the ring."""
        return float((self._half - 1) // self.num_sites)

    @property
    def value_scale(self) -> float:
        """Integer units per unit of weighted update: ``num_sites`` values of at most ``clip_range`` fit."""
        return float(int((self._half - 1) // (self.num_sites * self.clip_range)))

    @property
    def unit_error(self) -> float:
        """Worst rounding error of one encoded element, in integer units.

        Half a unit from rounding, plus float64's relative error (2^-53 per operation, three operations)
        on values up to ``2^(bits-1) / num_sites``: negligible at 32 bits, about 1000 units out of
        ~10^17 at 64 bits.
        """
        return 0.5 + 3 * 2.0**-53 * self._half / self.num_sites

    def encode(self, update: np.ndarray, weight: float) -> tuple[np.ndarray, float]:
        """Ring elements for ``[w, w * clip(update)]`` and the fraction of coordinates the clip changed.

        Args:
            update: flat float update.
            weight: the site's aggregation weight, in ``(0, max_weight]``.

        Raises:
            ValueError: a weight outside ``(0, max_weight]`` or a non-finite update.
        """
        if not 0 < weight <= self.max_weight:
            raise ValueError(f"aggregation weight {weight} is outside (0, max_weight={self.max_weight}]; "
                             f"raise the secure aggregation max_weight")
        x = np.asarray(update, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            raise ValueError("the update has non-finite values")
        clipped = np.clip(x, -self.clip_range, self.clip_range)
        fraction = float(np.count_nonzero(clipped != x)) / max(x.size, 1)
        w = weight / self.max_weight
        ints = np.empty(x.size + 1, dtype=np.int64)
        ints[0] = round(w * self.weight_scale)
        # float64 rounding is exact up to 2^53; 64-bit rings scale beyond that, so the int64 cast is the last step
        np.rint(clipped * (w * self.value_scale), out=clipped)
        ints[1:] = clipped.astype(np.int64)
        return ints.astype(self.dtype), fraction  # two's complement: negative values wrap into the ring

    def decode_sum(self, ring_sum: np.ndarray, contributors: int) -> tuple[np.ndarray, float, float]:
        """The weighted mean update from the unmasked modular sum, with its worst-case error.

        Args:
            ring_sum: the modular sum of ``contributors`` encoded vectors.
            contributors: how many vectors were summed.

        Returns:
            ``(mean, total_weight, error_bound)``: the float64 weighted mean of the clipped updates,
            the total normalised weight, and the bound such that every coordinate of ``mean`` is within
            ``error_bound`` of the exact weighted mean of the clipped updates.
        """
        if contributors > self.num_sites:
            raise ValueError(f"{contributors} contributors exceed the {self.num_sites} the encoding was sized for")
        signed = ring_sum.astype(self.dtype).view(np.int32 if self.bits == 32 else np.int64).astype(np.float64)
        total_w = signed[0] / self.weight_scale
        if total_w <= 0:
            raise ValueError(f"the unmasked total weight is {total_w}: the sum did not unmask")
        mean = signed[1:] / self.value_scale / total_w
        # |A^/B^ - A/B| <= (eA + |A^/B^| eB) / (B^ - eB), with eA, eB the summed rounding errors of the
        # weighted values and of the weights (docs/secure_aggregation.md); the sum's float64 conversion and the
        # two divisions add a few ulps of |mean| on top.
        conversion = 2.0**-53 * self._half
        err_num = (contributors * self.unit_error + conversion) / self.value_scale
        err_w = (contributors * self.unit_error + conversion) / self.weight_scale
        if total_w <= err_w:
            return mean, total_w, float("inf")
        peak = float(np.max(np.abs(mean), initial=0.0))
        bound = (err_num + peak * err_w) / (total_w - err_w) + 8 * 2.0**-53 * peak
        return mean, total_w, bound
