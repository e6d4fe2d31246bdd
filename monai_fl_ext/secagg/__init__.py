"""Secure aggregation by pairwise masking (pure Python: keys, PRG, fixed point, secret sharing, protocol)."""

from monai_fl_ext.secagg.fixed_point import FixedPoint
from monai_fl_ext.secagg.protocol import (
    AggregateResult,
    RoundConfig,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggServer,
    default_threshold,
    flatten,
    unflatten,
)

__all__ = ["AggregateResult", "FixedPoint", "RoundConfig", "SecAggAbort", "SecAggClient", "SecAggError", "SecAggServer",
           "default_threshold", "flatten", "unflatten"]
