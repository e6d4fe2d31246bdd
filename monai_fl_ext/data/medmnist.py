"""Turn MedMNIST's ``chestmnist.npz`` into PNG files plus a MONAI datalist.

ChestMNIST is NIH ChestX-ray14 resized (28x28 by default, 64/128/224 in MedMNIST+), with the same
14 labels in the same order as :data:`~monai_fl_ext.data.datalist.CHEST_XRAY14_LABELS` and its own
official train/val/test split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from monai_fl_ext.data.datalist import CHEST_XRAY14_LABELS, write_datalist
from monai_fl_ext.errors import InputError
from monai_fl_ext.io import atomic_output_dir

# MedMNIST split prefix -> datalist split name.
SPLIT_NAMES: dict[str, str] = {"train": "training", "val": "validation", "test": "test"}
SOURCE = "medmnist-chestmnist"


def _load_npz(npz_path: Path) -> dict[str, np.ndarray]:
    """Read the six image/label arrays, raising InputError naming the file (and key) on failure."""
    try:
        archive = np.load(npz_path, allow_pickle=False)
    except FileNotFoundError as e:
        raise InputError(f"{npz_path}: file not found") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{npz_path}: not a readable .npz file ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{npz_path}: a single .npy array, not an .npz archive")
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for prefix in SPLIT_NAMES:
            for kind in ("images", "labels"):
                key = f"{prefix}_{kind}"
                if key not in archive.files:
                    raise InputError(f"{npz_path}: missing key '{key}' (has {sorted(archive.files)})")
                try:
                    arrays[key] = archive[key]
                except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                    raise InputError(f"{npz_path}: cannot read key '{key}' ({e})") from e
    return arrays


def _check_split(npz_path: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Validate one split; return the images as (N, H, W) uint8."""
    ikey, lkey = f"{prefix}_images", f"{prefix}_labels"
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise InputError(f"{npz_path}: '{ikey}' must have shape (N, H, W) or (N, H, W, 1), got {images.shape}")
    if images.dtype != np.uint8:
        raise InputError(f"{npz_path}: '{ikey}' must be uint8, got {images.dtype}")
    n_labels = len(CHEST_XRAY14_LABELS)
    if labels.ndim != 2 or labels.shape[1] != n_labels:
        raise InputError(f"{npz_path}: '{lkey}' must have shape (N, {n_labels}), got {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise InputError(
            f"{npz_path}: '{ikey}' has {images.shape[0]} images but '{lkey}' has {labels.shape[0]} rows"
        )
    if labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
        raise InputError(f"{npz_path}: '{lkey}' must contain only 0 and 1")
    return images


def materialise_chestmnist(npz_path: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write ChestMNIST as ``out_dir/images/{split}/{index:06d}.png`` plus ``out_dir/datalist.json``.

    MedMNIST carries no patient ids, so each image is treated as its own patient
    (``"patient": "{split}-{index:06d}"``); patient-level leakage inside MedMNIST's official split
    cannot be checked. The official splits are kept (train -> training, val -> validation,
    test -> test). The whole folder is built under a temporary name and moved into place only on
    success, so an error leaves no ``out_dir`` behind (an existing one is replaced only on success).

    Args:
        npz_path: MedMNIST ``chestmnist.npz`` (keys ``{train,val,test}_{images,labels}``; images uint8
            (N, H, W) or (N, H, W, 1); labels (N, 14) of 0/1).
        out_dir: the dataset folder to create.
        seed: unused, since nothing is random; accepted so all loaders share one signature.

    Returns:
        The path of the written ``datalist.json``; its image paths are relative to ``out_dir``.

    Raises:
        InputError: the file is missing or not an .npz archive, or a key is missing or malformed
            (wrong shape or dtype, image/label count mismatch, labels not 0/1 or not 14 columns);
            the message names the file and the key.
    """
    del seed
    npz_path, out_dir = Path(npz_path), Path(out_dir)
    arrays = _load_npz(npz_path)
    images = {p: _check_split(npz_path, p, arrays[f"{p}_images"], arrays[f"{p}_labels"]) for p in SPLIT_NAMES}
    datalist: dict[str, Any] = {"labels": list(CHEST_XRAY14_LABELS), "source": SOURCE}
    with atomic_output_dir(out_dir) as tmp:
        for prefix, split in SPLIT_NAMES.items():
            (tmp / "images" / prefix).mkdir(parents=True)
            labels = arrays[f"{prefix}_labels"].astype(np.int64)
            items = []
            for i, image in enumerate(images[prefix]):
                rel = f"images/{prefix}/{i:06d}.png"
                Image.fromarray(np.ascontiguousarray(image)).save(tmp / rel)
                items.append({"image": rel, "label": labels[i].tolist(), "patient": f"{prefix}-{i:06d}"})
            datalist[split] = items
        write_datalist(tmp / "datalist.json", datalist)
    return out_dir / "datalist.json"
