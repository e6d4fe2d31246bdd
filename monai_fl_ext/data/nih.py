"""Loader for a real NIH ChestX-ray14 download (https://nihcc.app.box.com/v/ChestXray-NIHCC).

Expected layout under ``root`` (the images may sit in any sub-folders)::

    Data_Entry_2017.csv            (or Data_Entry_2017_v2020.csv)
    train_val_list.txt, test_list.txt   (optional official split)
    images_001/images/00000001_000.png, images_002/images/..., or images/...

The loader writes a MONAI datalist (see :mod:`monai_fl_ext.data.datalist`) with image paths relative
to ``root`` and a patient-wise split.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from monai_fl_ext.data.datalist import CHEST_XRAY14_LABELS, SPLITS, multi_hot, validate_datalist, write_datalist
from monai_fl_ext.data.splits import check_patients_disjoint, holdout_patients, patient_split
from monai_fl_ext.errors import InputError

logger = logging.getLogger(__name__)

SITE_COLUMN = "Site"
CSV_NAMES: tuple[str, ...] = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
REQUIRED_COLUMNS: tuple[str, ...] = ("Image Index", "Finding Labels", "Patient ID")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SOURCE = "nih-chestxray14"


@dataclass(frozen=True)
class Entry:
    """One CSV row: image file name, multi-hot label, patient id, the 1-based CSV line and the
    acquiring site (the optional ``Site`` column the synthetic generator writes; empty if absent)."""

    image: str
    label: list[int]
    patient: str
    line: int
    site: str = ""


def find_data_entry_csv(root: str | os.PathLike) -> Path:
    """Return the ``Data_Entry_2017*.csv`` in ``root`` (the first of :data:`CSV_NAMES` that exists).

    Raises:
        InputError: none of :data:`CSV_NAMES` is in ``root``.
    """
    root = Path(root)
    for name in CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise InputError(f"{root}: no {' or '.join(CSV_NAMES)} found (is this the ChestX-ray14 folder?)")


def _row_length_ok(row: list[str], header: list[str]) -> bool:
    """Accept the exact header width, and the release's trailing-comma variants (empty extra fields)."""
    core = len(header)
    while core and not header[core - 1].strip():
        core -= 1
    if core <= len(row) <= len(header):
        return True
    return len(row) > len(header) and not any(v.strip() for v in row[len(header) :])


def read_data_entry(csv_path: str | os.PathLike) -> list[Entry]:
    """Parse ``Data_Entry_2017.csv``.

    Only ``Image Index``, ``Finding Labels`` (pipe-separated, or "No Finding") and ``Patient ID`` are
    used; other columns are optional. The release's unquoted ``OriginalImage[Width,Height]`` header
    and trailing commas are accepted.

    Args:
        csv_path: the CSV file.

    Returns:
        One :class:`Entry` per data row, in file order.

    Raises:
        InputError: naming the file (and the 1-based line) for an unreadable file, a missing required
            column, a row with the wrong number of fields, an empty image name, label or patient id,
            a duplicate image name, or an unknown finding.
    """
    csv_path = Path(csv_path)
    entries: list[Entry] = []
    first_line: dict[str, int] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(f"{csv_path}:1: missing required column(s) {missing}; header is {header}")
            col = {c: header.index(c) for c in (*REQUIRED_COLUMNS, SITE_COLUMN) if c in header}
            for row in reader:
                line = reader.line_num
                if not row or not any(v.strip() for v in row):
                    continue
                where = f"{csv_path}:{line}"
                if not _row_length_ok(row, header):
                    raise InputError(f"{where}: expected {len(header)} fields as in the header, got {len(row)}")
                image, findings, patient = (row[col[c]].strip() for c in REQUIRED_COLUMNS)
                if not image:
                    raise InputError(f"{where}: empty 'Image Index'")
                if not findings:
                    raise InputError(f"{where}: empty 'Finding Labels' (use 'No Finding')")
                if not patient:
                    raise InputError(f"{where}: empty 'Patient ID'")
                if image in first_line:
                    raise InputError(f"{where}: duplicate image '{image}' (first on line {first_line[image]})")
                first_line[image] = line
                site = row[col[SITE_COLUMN]].strip() if SITE_COLUMN in col else ""
                entries.append(Entry(image, multi_hot(findings.split("|"), where=where), patient, line, site))
    except FileNotFoundError as e:
        raise InputError(f"{csv_path}: file not found") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{csv_path}: not a readable CSV ({e})") from e
    if not entries:
        raise InputError(f"{csv_path}: no data rows")
    return entries


def index_pngs(root: str | os.PathLike) -> dict[str, list[Path]]:
    """Find every ``*.png`` under ``root`` (recursively, following folder links once).

    Returns:
        ``{file name: [paths]}``; more than one path means the name is ambiguous.
    """
    found: dict[str, list[Path]] = {}
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".png"):
                found.setdefault(name, []).append(Path(dirpath) / name)
    return found


def read_image_list(path: Path) -> list[str]:
    """Image names of an official list file (one per line, blanks ignored)."""
    try:
        return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read image list ({e})") from e


def _official_assignment(root: Path, entries: list[Entry], val_fraction: float, seed: int) -> dict[str, str]:
    """Split from ``train_val_list.txt``/``test_list.txt``: ``{image name: split}``.

    Patients with any image in the test list go to test only; the rest of the train_val patients are
    split patient-wise into training and validation.
    """
    test_images = set(read_image_list(root / TEST_LIST))
    train_val_images = set(read_image_list(root / TRAIN_VAL_LIST))
    both = sorted(test_images & train_val_images)
    if both:
        raise InputError(f"{root}: image '{both[0]}' is in both {TEST_LIST} and {TRAIN_VAL_LIST}")
    known = {e.image for e in entries}
    unknown = sorted((test_images | train_val_images) - known)
    if unknown:
        logger.warning("%d listed image(s) are not in the CSV and are ignored, e.g. %s", len(unknown), unknown[0])
    unlisted = sorted(known - test_images - train_val_images)
    if unlisted:
        logger.warning(
            "%d CSV image(s) are in neither official list and are left out, e.g. %s", len(unlisted), unlisted[0]
        )
    test_patients = {e.patient for e in entries if e.image in test_images}
    train_val_patients = {e.patient for e in entries if e.image in train_val_images}
    shared = train_val_patients & test_patients
    if shared:
        logger.warning(
            "%d patient(s) have images in both official lists; kept in test only, removed from training/validation",
            len(shared),
        )
    val_patients = holdout_patients(train_val_patients - test_patients, val_fraction, seed)
    assignment: dict[str, str] = {}
    for e in entries:
        if e.patient in test_patients:
            if e.image in test_images:
                assignment[e.image] = "test"
        elif e.image in train_val_images:
            assignment[e.image] = "validation" if e.patient in val_patients else "training"
    return assignment


def _check_fraction_args(val_fraction: float, test_fraction: float) -> None:
    """Raise InputError naming the parameter unless both are in [0, 1] and sum to at most 1."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"{name} must be in [0, 1], got {value!r}")
    if val_fraction + test_fraction > 1.0 + 1e-6:
        raise InputError(f"val_fraction + test_fraction must be <= 1, got {val_fraction} + {test_fraction}")


def _verify_png(path: Path) -> None:
    """Read the image header (size) without decoding pixels."""
    try:
        with Image.open(path) as im:
            _ = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from e


def build_nih_datalist(
    root: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    on_missing: str = "error",
    verify_images: bool = True,
) -> dict[str, Any]:
    """Build a patient-wise MONAI datalist from a ChestX-ray14 download.

    With ``train_val_list.txt`` and ``test_list.txt`` in ``root`` the official split is kept (a
    patient listed in both stays in test only and is dropped from training/validation, with a
    warning), ``val_fraction`` of the train_val patients become validation and ``test_fraction`` is
    unused; CSV images in neither list are left out. Otherwise patients are split with
    :func:`~monai_fl_ext.data.splits.patient_split` into
    ``(1 - val_fraction - test_fraction, val_fraction, test_fraction)``. The split is computed from
    all CSV rows, so it does not change when some images are missing.

    Args:
        root: the dataset folder (CSV, optional list files, images in any sub-folders).
        out_path: if given, the datalist is written there atomically as canonical JSON.
        val_fraction: share of patients for validation.
        test_fraction: share of patients for test (without official lists).
        seed: random seed of the patient split.
        on_missing: ``"error"`` to fail on a CSV image that is not on disk, ``"skip"`` to leave it
            out (the number skipped is logged).
        verify_images: open each image's header with PIL to catch unreadable files.

    Returns:
        ``{"labels", "source", "training", "validation", "test"}``; items are
        ``{"image": path relative to root (posix), "label": multi-hot, "patient": id}``, sorted by
        image name within each split.

    Raises:
        InputError: a bad parameter, CSV or list file (naming file and line), a missing image
            (naming it and its CSV line), an ambiguous image name, an unreadable image (naming the
            file), or an empty result.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: dataset folder not found")
    if on_missing not in ("error", "skip"):
        raise InputError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    _check_fraction_args(val_fraction, test_fraction)
    csv_path = find_data_entry_csv(root)
    entries = read_data_entry(csv_path)

    has_lists = [(root / name).is_file() for name in (TRAIN_VAL_LIST, TEST_LIST)]
    if all(has_lists):
        assignment = _official_assignment(root, entries, val_fraction, seed)
    else:
        if any(has_lists):
            logger.warning("only one of %s, %s in %s; using a random patient split", TRAIN_VAL_LIST, TEST_LIST, root)
        fractions = (max(0.0, 1.0 - val_fraction - test_fraction), val_fraction, test_fraction)
        by_patient = patient_split((e.patient for e in entries), fractions=fractions, seed=seed)
        assignment = {e.image: by_patient[e.patient] for e in entries}

    pngs = index_pngs(root)
    datalist: dict[str, Any] = {"labels": list(CHEST_XRAY14_LABELS), "source": SOURCE}
    datalist.update({split: [] for split in SPLITS})
    skipped: list[str] = []
    for e in entries:
        split = assignment.get(e.image)
        if split is None:
            continue
        paths = pngs.get(e.image, [])
        if not paths:
            if on_missing == "error":
                raise InputError(f"{csv_path}:{e.line}: image '{e.image}' not found under {root}")
            skipped.append(e.image)
            continue
        if len(paths) > 1:
            raise InputError(f"{csv_path}:{e.line}: image '{e.image}' found more than once: {paths[0]}, {paths[1]}")
        if verify_images:
            _verify_png(paths[0])
        rel = Path(os.path.relpath(paths[0], root)).as_posix()
        item = {"image": rel, "label": e.label, "patient": e.patient}
        if e.site:
            item["site"] = e.site
        datalist[split].append(item)
    if skipped:
        logger.warning("skipped %d CSV image(s) not found under %s, e.g. %s", len(skipped), root, skipped[0])
    for split in SPLITS:
        datalist[split].sort(key=lambda item: (Path(item["image"]).name, item["image"]))
    source = str(out_path) if out_path is not None else str(csv_path)
    check_patients_disjoint(datalist, source)
    validate_datalist(datalist, source)
    if out_path is not None:
        write_datalist(out_path, datalist)
    return datalist
