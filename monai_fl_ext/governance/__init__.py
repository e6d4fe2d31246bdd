"""Model governance: signed audit trail, model registry, contribution ledger, dashboard and PDF audit report.

Plain Python (no FLARE import): the server workflow drives :class:`GovernanceRecorder` as events happen,
and the report tools read a finished or still-running job's server output folder.
"""

from monai_fl_ext.governance.audit import AuditTrail, Verdict, load_public_key, verify_trail
from monai_fl_ext.governance.events import GOVERNANCE_DIR, GovernanceRecorder
from monai_fl_ext.governance.ledger import ContributionLedger, assert_no_raw_updates, contribution_stats, find_raw_updates
from monai_fl_ext.governance.registry import ModelRegistry, export_version, tensor_sha256

__all__ = [
    "GOVERNANCE_DIR",
    "AuditTrail",
    "ContributionLedger",
    "GovernanceRecorder",
    "ModelRegistry",
    "Verdict",
    "assert_no_raw_updates",
    "contribution_stats",
    "export_version",
    "find_raw_updates",
    "load_public_key",
    "tensor_sha256",
    "verify_trail",
]
