"""MONAI datalist JSON: the one format every loader writes and every bundle reads.

A datalist is ``{"labels": [...], "training": [...], "validation": [...], "test": [...]}``; each item
is ``{"image": path relative to the dataset folder, "label": multi-hot list, "patient": id}`` and
may carry ``"site"`` (acquiring hospital). Bundles read it with
``monai.data.load_decathlon_datalist(path, is_segmentation=False, data_list_key=..., base_dir=dataset_dir)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_write_json, read_json

# The 14 findings of NIH ChestX-ray14, in the order of its paper and of MedMNIST's ChestMNIST.
CHEST_XRAY14_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
SPLITS: tuple[str, ...] = ("training", "validation", "test")


def multi_hot(findings: Sequence[str], labels: Sequence[str] = CHEST_XRAY14_LABELS, where: str = "") -> list[int]:
    """Turn finding names into a multi-hot vector over ``labels``.

    Args:
        findings: finding names; ``"No Finding"`` (alone) means all zeros.
        labels: the label vocabulary.
        where: text naming the file and row, used in error messages.

    Returns:
        A list of 0/1 of length ``len(labels)``.

    Raises:
        InputError: a name is not in ``labels``, or "No Finding" is combined with a finding.
    """
    index = {name: i for i, name in enumerate(labels)}
    vec = [0] * len(labels)
    names = [f.strip() for f in findings if f.strip()]
    if NO_FINDING in names:
        if len(names) > 1:
            raise InputError(f"{where}: '{NO_FINDING}' combined with findings {names}")
        return vec
    for name in names:
        if name not in index:
            raise InputError(f"{where}: unknown label '{name}' (known: {', '.join(labels)}, {NO_FINDING})")
        vec[index[name]] = 1
    return vec


def validate_datalist(datalist: dict[str, Any], source: str = "datalist") -> dict[str, Any]:
    """Check a datalist's structure and return it unchanged.

    Raises:
        InputError: naming the split and item index of the first malformed item.
    """
    labels = datalist.get("labels")
    if not isinstance(labels, list) or not labels:
        raise InputError(f"{source}: missing non-empty 'labels' list")
    if not any(datalist.get(s) for s in SPLITS):
        raise InputError(f"{source}: no items in any of {SPLITS}")
    for split in SPLITS:
        items = datalist.get(split, [])
        if not isinstance(items, list):
            raise InputError(f"{source}: '{split}' must be a list")
        for i, item in enumerate(items):
            where = f"{source}: {split}[{i}]"
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                raise InputError(f"{where}: item needs 'image' and 'label'")
            label = item["label"]
            if not isinstance(label, list) or len(label) != len(labels) or any(v not in (0, 1) for v in label):
                raise InputError(f"{where}: label must be a 0/1 list of length {len(labels)}, got {label!r}")
    return datalist


def write_datalist(path: str | os.PathLike, datalist: dict[str, Any]) -> Path:
    """Validate and write a datalist atomically as canonical JSON."""
    validate_datalist(datalist, str(path))
    return atomic_write_json(path, datalist)


def read_datalist(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a datalist JSON file."""
    return validate_datalist(read_json(path), str(path))


def split_counts(datalist: dict[str, Any]) -> dict[str, int]:
    """Number of items per split."""
    return {s: len(datalist.get(s, [])) for s in SPLITS}
