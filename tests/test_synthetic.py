"""Tests for monai_fl_ext.data.synthetic: determinism, NIH layout, label mix, hospital effects, learnability, errors."""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_fl_ext.data.datalist import CHEST_XRAY14_LABELS, NO_FINDING
from monai_fl_ext.data.nih import build_nih_datalist
from monai_fl_ext.data.synthetic import NIH_CSV_COLUMNS, SyntheticSpec, generate_synthetic_cxr
from monai_fl_ext.errors import InputError

LABELS = list(CHEST_XRAY14_LABELS)
NIH_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)
LEARNABLE = ("Cardiomegaly", "Effusion", "Mass", "Pneumothorax", "Emphysema")


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def read_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "Data_Entry_2017.csv", newline="") as f:
        return list(csv.DictReader(f))


def load_pixels(root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    paths = {p.name: p for p in root.glob("images_*/images/*.png")}
    return np.stack([np.asarray(Image.open(paths[r["Image Index"]]), dtype=np.float32) / 255.0 for r in rows])


def label_matrix(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[name in r["Finding Labels"].split("|") for name in LABELS] for r in rows], dtype=int)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """~300 patients at 32 px with hospital variation (the default profiles)."""
    out = tmp_path_factory.mktemp("cohort") / "nih"
    return generate_synthetic_cxr(out, SyntheticSpec(num_patients=300, image_size=32, seed=0), progress=False)


@pytest.fixture(scope="module")
def cohort_rows(cohort) -> list[dict[str, str]]:
    return read_rows(cohort)


@pytest.fixture(scope="module")
def cohort_pixels(cohort, cohort_rows) -> np.ndarray:
    return load_pixels(cohort, cohort_rows)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_tree(tmp_path):
    spec = SyntheticSpec(num_patients=15, image_size=32, images_per_folder=10, seed=7)
    a = generate_synthetic_cxr(tmp_path / "a", spec, progress=False)
    b = generate_synthetic_cxr(tmp_path / "b", spec, progress=False)
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    assert tree_digest(a) == tree_digest(b)
    for name in ("Data_Entry_2017.csv", "train_val_list.txt", "test_list.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_different_seed_differs(tmp_path):
    a = generate_synthetic_cxr(tmp_path / "a", SyntheticSpec(num_patients=15, image_size=32, seed=0), progress=False)
    b = generate_synthetic_cxr(tmp_path / "b", SyntheticSpec(num_patients=15, image_size=32, seed=1), progress=False)
    assert tree_digest(a) != tree_digest(b)
    assert (a / "Data_Entry_2017.csv").read_bytes() != (b / "Data_Entry_2017.csv").read_bytes()


def test_regenerating_into_the_same_dir_replaces_it(tmp_path):
    out = tmp_path / "d"
    generate_synthetic_cxr(out, SyntheticSpec(num_patients=12, image_size=32, seed=0), progress=False)
    first = tree_digest(out)
    generate_synthetic_cxr(out, SyntheticSpec(num_patients=5, image_size=32, seed=3), progress=False)
    assert tree_digest(out) != first
    assert len({r["Patient ID"] for r in read_rows(out)}) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old folders left behind


# --- NIH layout --------------------------------------------------------------------------------


def test_nih_layout(cohort, cohort_rows):
    with open(cohort / "Data_Entry_2017.csv", newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == NIH_CSV_COLUMNS == (*NIH_COLUMNS, "Site")

    pngs = sorted(cohort.glob("*/images/*.png"))
    assert pngs and all(re.fullmatch(r"images_\d{3}", p.parent.parent.name) for p in pngs)
    assert sorted(p.name for p in cohort.rglob("*.png")) == sorted(p.name for p in pngs)  # nothing elsewhere
    names = [r["Image Index"] for r in cohort_rows]
    assert len(names) == len(set(names)) == len(pngs)
    assert set(names) == {p.name for p in pngs}
    for r in cohort_rows:
        assert re.fullmatch(r"\d{8}_\d{3}\.png", r["Image Index"])
        assert r["Image Index"].startswith(f"{int(r['Patient ID']):08d}_")
        assert r["Site"].startswith("hospital-")
        assert r["Patient Gender"] in ("M", "F")
        assert r["View Position"] in ("PA", "AP")
    with Image.open(pngs[0]) as im:
        assert im.mode == "L" and im.size == (32, 32)

    train_val = (cohort / "train_val_list.txt").read_text().split()
    test = (cohort / "test_list.txt").read_text().split()
    assert train_val and test
    assert set(train_val).isdisjoint(test)
    assert sorted(train_val + test) == sorted(names)  # every image, exactly once
    patient = {r["Image Index"]: r["Patient ID"] for r in cohort_rows}
    assert {patient[n] for n in train_val}.isdisjoint({patient[n] for n in test})


def test_several_images_per_patient(cohort_rows):
    per_patient = Counter(r["Patient ID"] for r in cohort_rows)
    assert len(per_patient) == 300
    assert sum(n >= 2 for n in per_patient.values()) > 0.5 * len(per_patient)
    assert max(per_patient.values()) <= SyntheticSpec().max_images_per_patient
    # follow-up numbers run 0..n-1 per patient
    for pid, n in per_patient.items():
        visits = sorted(int(r["Follow-up #"]) for r in cohort_rows if r["Patient ID"] == pid)
        assert visits == list(range(n))


def test_label_mix(cohort_rows):
    strings = Counter(r["Finding Labels"] for r in cohort_rows)
    assert strings.most_common(1)[0][0] == NO_FINDING
    findings = Counter(name for r in cohort_rows for name in r["Finding Labels"].split("|"))
    missing = [name for name in LABELS if findings[name] == 0]
    assert missing == []
    assert set(findings) == {*LABELS, NO_FINDING}
    assert all(NO_FINDING not in s.split("|") or s == NO_FINDING for s in strings)


def test_images_per_folder_splits_into_folders(tmp_path):
    out = generate_synthetic_cxr(
        tmp_path / "d", SyntheticSpec(num_patients=12, image_size=32, images_per_folder=5, seed=0), progress=False
    )
    n_images = len(read_rows(out))
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == -(-n_images // 5) >= 3
    assert folders == [f"images_{k:03d}" for k in range(1, len(folders) + 1)]
    counts = [len(list((out / f / "images").glob("*.png"))) for f in folders]
    assert all(c == 5 for c in counts[:-1]) and 1 <= counts[-1] <= 5
    assert sum(counts) == n_images


# --- hospitals ---------------------------------------------------------------------------------


def _site_stats(pixels: np.ndarray, sites: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-site mean intensity and background noise (std of the top rows, which lie outside the body)."""
    names = sorted(set(sites))
    means = np.array([pixels[sites == s].mean() for s in names])
    noise = np.array([pixels[sites == s][:, :2, :].std() for s in names])
    return means, noise


def test_hospital_acquisition_differences(tmp_path, cohort, cohort_rows, cohort_pixels):
    sites = np.array([r["Site"] for r in cohort_rows])
    assert set(sites) == {"hospital-1", "hospital-2", "hospital-3"}
    means, noise = _site_stats(cohort_pixels, sites)

    flat = generate_synthetic_cxr(
        tmp_path / "flat", SyntheticSpec(num_patients=300, image_size=32, seed=0, hospital_variation=False), progress=False
    )
    flat_rows = read_rows(flat)
    # same patients, sites and labels: only the rendering differs
    assert [(r["Image Index"], r["Finding Labels"], r["Site"]) for r in flat_rows] == [
        (r["Image Index"], r["Finding Labels"], r["Site"]) for r in cohort_rows
    ]
    flat_pixels = load_pixels(flat, flat_rows)
    flat_means, flat_noise = _site_stats(flat_pixels, sites)

    assert np.ptp(means) > 0.05
    assert np.ptp(flat_means) < 0.02
    assert np.ptp(means) > 5 * np.ptp(flat_means)
    assert np.ptp(noise) > 2 * np.ptp(flat_noise)

    # with identical profiles the same anatomy renders identically: hospital-1 uses the reference profile in
    # both cohorts, so its images are unchanged; the other hospitals' images change.
    same = np.array([np.array_equal(a, b) for a, b in zip(cohort_pixels, flat_pixels)])
    assert same[sites == "hospital-1"].all()
    assert not same[sites != "hospital-1"].any()


# --- learnability ------------------------------------------------------------------------------


def test_findings_are_learnable_but_not_trivial(cohort_rows, cohort_pixels):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    n = len(cohort_pixels)
    x = cohort_pixels.reshape(n, 16, 2, 16, 2).mean(axis=(2, 4)).reshape(n, -1)  # 2x2-pooled to 16x16
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)  # per-image standardisation
    y = label_matrix(cohort_rows)
    patient = np.array([int(r["Patient ID"]) for r in cohort_rows])
    train, test = patient % 2 == 0, patient % 2 == 1  # patient-wise halves
    aucs = {}
    for name in LEARNABLE:
        j = LABELS.index(name)
        if y[train, j].sum() < 2 or y[test, j].sum() < 2:
            continue
        clf = LogisticRegression(C=0.1, max_iter=1000).fit(x[train], y[train, j])
        aucs[name] = roc_auc_score(y[test, j], clf.decision_function(x[test]))
    assert len(aucs) >= 4, aucs
    learned = [name for name, auc in aucs.items() if auc > 0.65]
    assert len(learned) >= 3, aucs
    assert np.mean(list(aucs.values())) < 0.999, aucs


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [("num_patients", 0), ("image_size", 8), ("test_fraction", 1.0), ("healthy_fraction", 1.0)],
)
def test_invalid_spec_raises_and_writes_nothing(tmp_path, name, value):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=name):
        generate_synthetic_cxr(out, SyntheticSpec(**{name: value}), progress=False)
    assert not out.exists()
    assert os.listdir(tmp_path) == []


# --- datalist ----------------------------------------------------------------------------------


def test_nih_datalist_carries_site(cohort, cohort_rows):
    datalist = build_nih_datalist(cohort, seed=0)
    site = {r["Image Index"]: r["Site"] for r in cohort_rows}
    items = [item for split in ("training", "validation", "test") for item in datalist[split]]
    assert len(items) == len(cohort_rows)
    assert datalist["test"]
    for item in items:
        assert item["site"] == site[Path(item["image"]).name]
    test_names = {Path(i["image"]).name for i in datalist["test"]}
    assert test_names == set((cohort / "test_list.txt").read_text().split())
