"""Differential privacy for per-site DP-SGD: settings, calibration and a persistent accountant.

See :mod:`monai_fl_ext.privacy.accountant` for why each site keeps one accountant for the
whole job and why sample-level DP at each site is the guarantee to report.
"""

from monai_fl_ext.privacy.accountant import (
    ACCOUNTANTS,
    CLIENT_LEVEL_ORDERS,
    STATE_FORMAT,
    BudgetExceeded,
    DPSettings,
    PersistentAccountant,
    client_level_epsilon,
    dp_accounting_rdp_epsilon,
    noise_for_target,
    opacus_rdp_epsilon,
)
from monai_fl_ext.privacy.dp_sgd import DPTrainingState, enable_dp_sgd

__all__ = [
    "ACCOUNTANTS",
    "CLIENT_LEVEL_ORDERS",
    "STATE_FORMAT",
    "BudgetExceeded",
    "DPSettings",
    "DPTrainingState",
    "PersistentAccountant",
    "client_level_epsilon",
    "dp_accounting_rdp_epsilon",
    "enable_dp_sgd",
    "noise_for_target",
    "opacus_rdp_epsilon",
]
