"""Data layer: synthetic generator, real-format loaders, datalist I/O."""

from monai_fl_ext.data.datalist import (
    CHEST_XRAY14_LABELS,
    NO_FINDING,
    SPLITS,
    multi_hot,
    read_datalist,
    split_counts,
    validate_datalist,
    write_datalist,
)

__all__ = [
    "CHEST_XRAY14_LABELS",
    "NO_FINDING",
    "SPLITS",
    "multi_hot",
    "read_datalist",
    "split_counts",
    "validate_datalist",
    "write_datalist",
]
