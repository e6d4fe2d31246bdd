"""Real-format loaders: NIH ChestX-ray14 download, MedMNIST chestmnist.npz, patient-wise splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_fl_ext.data.datalist import CHEST_XRAY14_LABELS, SPLITS, multi_hot, read_datalist
from monai_fl_ext.data.medmnist import materialise_chestmnist
from monai_fl_ext.data.nih import build_nih_datalist
from monai_fl_ext.data.splits import check_patients_disjoint, holdout_patients, patient_split
from monai_fl_ext.errors import InputError

# The release's header: the bracketed columns are unquoted, so each is two CSV fields.
HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
FINDINGS = [
    "No Finding",
    "Cardiomegaly",
    "Cardiomegaly|Effusion",
    "Hernia",
    "Pleural_Thickening|Mass|Nodule",
    "Infiltration",
    "No Finding",
]
N_PATIENTS = 10


def make_nih(root: Path, trailing_comma: bool = True) -> dict[str, dict]:
    """A small ChestX-ray14-like tree: 10 patients x 2-3 random PNGs in two image folders.

    Returns:
        ``{image name: {"findings", "patient", "line"}}``.
    """
    rng = np.random.default_rng(123)
    end = "," if trailing_comma else ""
    lines = [HEADER + end]
    expected: dict[str, dict] = {}
    for pid in range(1, N_PATIENTS + 1):
        folder = root / ("images_001" if pid <= 5 else "images_002") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(2 + pid % 2):
            name = f"{pid:08d}_{k:03d}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name)
            findings = FINDINGS[(pid + k) % len(FINDINGS)]
            gender = "M" if pid % 2 else "F"
            lines.append(f"{name},{findings},{k},{pid},{40 + pid},{gender},PA,2500,2048,0.143,0.143{end}")
            expected[name] = {"findings": findings, "patient": str(pid), "line": len(lines)}
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return expected


def write_official_lists(root: Path, test_names: list[str], train_val: list[str]) -> None:
    (root / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")


def all_items(datalist: dict) -> list[dict]:
    return [item for split in SPLITS for item in datalist[split]]


def split_of_patients(datalist: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for split in SPLITS:
        for item in datalist[split]:
            out.setdefault(item["patient"], set()).add(split)
    return out


def rewrite_line(csv_path: Path, line: int, new: str) -> None:
    lines = csv_path.read_text().splitlines()
    lines[line - 1] = new
    csv_path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- splits


def test_patient_split_deterministic_and_complete():
    ids = [f"p{i}" for i in range(20)] * 2
    a = patient_split(ids, (0.7, 0.1, 0.2), seed=3)
    assert a == patient_split(list(reversed(ids)), (0.7, 0.1, 0.2), seed=3)
    assert set(a) == set(ids)
    counts = {s: sum(v == s for v in a.values()) for s in SPLITS}
    assert counts == {"training": 14, "validation": 2, "test": 4}
    assert patient_split(ids, (0.7, 0.1, 0.2), seed=4) != a


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5), (0.7, float("nan"), 0.3)])
def test_patient_split_bad_fractions(fractions):
    with pytest.raises(InputError, match="fractions"):
        patient_split(["a", "b"], fractions)


def test_holdout_patients():
    held = holdout_patients([str(i) for i in range(10)], 0.3, seed=1)
    assert len(held) == 3 and held == holdout_patients([str(i) for i in range(10)], 0.3, seed=1)
    with pytest.raises(InputError, match="fraction"):
        holdout_patients(["a"], 1.5)


def test_check_patients_disjoint():
    check_patients_disjoint({"training": [{"patient": "1"}], "test": [{"patient": "2"}]})
    with pytest.raises(InputError, match="'1'"):
        check_patients_disjoint({"training": [{"patient": "1"}], "test": [{"patient": "1"}]})


# --------------------------------------------------------------------------- NIH


@pytest.mark.parametrize("trailing_comma", [True, False])
def test_nih_random_split(tmp_path, trailing_comma):
    from monai.data import load_decathlon_datalist

    root = tmp_path / "nih"
    expected = make_nih(root, trailing_comma=trailing_comma)
    out = tmp_path / "datalist.json"
    dl = build_nih_datalist(root, out_path=out, val_fraction=0.2, test_fraction=0.2, seed=0)

    assert dl["labels"] == list(CHEST_XRAY14_LABELS) and dl["source"] == "nih-chestxray14"
    assert read_datalist(out) == dl
    items = all_items(dl)
    assert sorted(Path(i["image"]).name for i in items) == sorted(expected)
    for item in items:
        name = Path(item["image"]).name
        assert item["label"] == multi_hot(expected[name]["findings"].split("|"))
        assert item["patient"] == expected[name]["patient"]
        assert not Path(item["image"]).is_absolute() and "\\" not in item["image"]
        assert item["image"].startswith(("images_001/images/", "images_002/images/"))
        assert (root / item["image"]).is_file()
    assert all(len(s) == 1 for s in split_of_patients(dl).values())
    patients_per_split = {s: len({i["patient"] for i in dl[s]}) for s in SPLITS}
    assert patients_per_split == {"training": 6, "validation": 2, "test": 2}
    for split in SPLITS:
        names = [Path(i["image"]).name for i in dl[split]]
        assert names == sorted(names)

    for split in SPLITS:
        loaded = load_decathlon_datalist(str(out), is_segmentation=False, data_list_key=split, base_dir=str(root))
        assert len(loaded) == len(dl[split])
        for item in loaded:
            assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()

    assert build_nih_datalist(root, val_fraction=0.2, test_fraction=0.2, seed=0) == dl
    assert build_nih_datalist(root, val_fraction=0.2, test_fraction=0.2, seed=1) != dl


def test_nih_official_lists(tmp_path):
    root = tmp_path / "nih"
    names = sorted(make_nih(root))
    test_names = [n for n in names if int(n[:8]) >= 9]
    train_val = [n for n in names if n not in test_names]
    write_official_lists(root, test_names, train_val)
    dl = build_nih_datalist(root, val_fraction=0.25, test_fraction=0.5, seed=0)
    assert [Path(i["image"]).name for i in dl["test"]] == test_names
    assert sorted(Path(i["image"]).name for i in dl["training"] + dl["validation"]) == train_val
    assert len({i["patient"] for i in dl["validation"]}) == 2
    assert all(len(s) == 1 for s in split_of_patients(dl).values())


def test_nih_official_lists_patient_in_both(tmp_path, caplog):
    root = tmp_path / "nih"
    names = sorted(make_nih(root))
    test_names = [n for n in names if int(n[:8]) >= 9] + ["00000008_000.png"]
    train_val = [n for n in names if n not in test_names]
    write_official_lists(root, test_names, train_val)
    with caplog.at_level(logging.WARNING):
        dl = build_nih_datalist(root, val_fraction=0.25, seed=0)
    assert "both official lists" in caplog.text
    patients = split_of_patients(dl)
    assert patients["8"] == {"test"}
    assert [Path(i["image"]).name for i in dl["test"] if i["patient"] == "8"] == ["00000008_000.png"]
    assert all(len(s) == 1 for s in patients.values())


def test_nih_image_in_both_official_lists(tmp_path):
    root = tmp_path / "nih"
    names = sorted(make_nih(root))
    write_official_lists(root, names[-5:], names[:-4])
    with pytest.raises(InputError, match=f"'{names[-5]}' is in both"):
        build_nih_datalist(root)


def test_nih_v2020_csv_name(tmp_path):
    root = tmp_path / "nih"
    make_nih(root)
    (root / "Data_Entry_2017.csv").rename(root / "Data_Entry_2017_v2020.csv")
    assert len(all_items(build_nih_datalist(root))) == 25


def test_nih_unknown_label(tmp_path):
    root = tmp_path / "nih"
    expected = make_nih(root)
    line = expected["00000003_001.png"]["line"]
    rewrite_line(root / "Data_Entry_2017.csv", line, "00000003_001.png,Cardiomegaly|Flu,1,3,43,M,PA,1,1,1,1,")
    with pytest.raises(InputError, match=rf"Data_Entry_2017\.csv:{line}: unknown label 'Flu'"):
        build_nih_datalist(root)


def test_nih_missing_image_error_and_skip(tmp_path, caplog):
    root = tmp_path / "nih"
    make_nih(root)
    (root / "images_002" / "images" / "00000007_001.png").unlink()
    with pytest.raises(InputError, match="00000007_001.png"):
        build_nih_datalist(root)
    with caplog.at_level(logging.WARNING):
        dl = build_nih_datalist(root, on_missing="skip")
    assert "skipped 1" in caplog.text
    names = [Path(i["image"]).name for i in all_items(dl)]
    assert len(names) == 24 and "00000007_001.png" not in names
    with pytest.raises(InputError, match="on_missing"):
        build_nih_datalist(root, on_missing="ignore")


def test_nih_corrupt_png(tmp_path):
    root = tmp_path / "nih"
    make_nih(root)
    bad = root / "images_001" / "images" / "00000002_000.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="00000002_000.png"):
        build_nih_datalist(root)
    assert len(all_items(build_nih_datalist(root, verify_images=False))) == 25


def test_nih_missing_column(tmp_path):
    root = tmp_path / "nih"
    make_nih(root)
    rewrite_line(root / "Data_Entry_2017.csv", 1, HEADER.replace("Patient ID", "PatientID") + ",")
    with pytest.raises(InputError, match=r"Data_Entry_2017\.csv:1: missing required column.*Patient ID"):
        build_nih_datalist(root)


def test_nih_wrong_field_count(tmp_path):
    root = tmp_path / "nih"
    expected = make_nih(root)
    line = expected["00000004_000.png"]["line"]
    rewrite_line(root / "Data_Entry_2017.csv", line, "00000004_000.png,Hernia,0,4,44,F,PA,2500,2048")
    with pytest.raises(InputError, match=rf"Data_Entry_2017\.csv:{line}: expected 12 fields"):
        build_nih_datalist(root)
    rewrite_line(root / "Data_Entry_2017.csv", line, "00000004_000.png,Hernia,0,4,44,F,PA,2500,2048,1,1,,extra")
    with pytest.raises(InputError, match=rf":{line}: expected"):
        build_nih_datalist(root)


def test_nih_duplicate_and_empty_image_index(tmp_path):
    root = tmp_path / "nih"
    expected = make_nih(root)
    csv_path = root / "Data_Entry_2017.csv"
    line = expected["00000005_000.png"]["line"]
    rewrite_line(csv_path, line, "00000001_000.png,Hernia,0,5,45,M,PA,2500,2048,0.1,0.1,")
    with pytest.raises(InputError, match=rf":{line}: duplicate image '00000001_000.png'"):
        build_nih_datalist(root)
    rewrite_line(csv_path, line, ",Hernia,0,5,45,M,PA,2500,2048,0.1,0.1,")
    with pytest.raises(InputError, match=rf":{line}: empty 'Image Index'"):
        build_nih_datalist(root)


@pytest.mark.parametrize(("val", "test"), [(0.6, 0.6), (-0.1, 0.2), (0.1, 1.5)])
def test_nih_bad_fractions(tmp_path, val, test):
    root = tmp_path / "nih"
    make_nih(root)
    with pytest.raises(InputError, match="fraction"):
        build_nih_datalist(root, val_fraction=val, test_fraction=test)


def test_nih_no_csv(tmp_path):
    with pytest.raises(InputError, match="Data_Entry_2017"):
        build_nih_datalist(tmp_path)


# --------------------------------------------------------------------------- MedMNIST


def make_npz(path: Path, sizes=(8, 3, 4), channel_axis: bool = False, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {}
    for prefix, n in zip(("train", "val", "test"), sizes):
        shape = (n, 28, 28, 1) if channel_axis else (n, 28, 28)
        arrays[f"{prefix}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{prefix}_labels"] = rng.integers(0, 2, (n, 14), dtype=np.uint8)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


@pytest.mark.parametrize("channel_axis", [False, True])
def test_materialise_chestmnist(tmp_path, channel_axis):
    from monai.data import load_decathlon_datalist

    npz = tmp_path / "chestmnist.npz"
    arrays = make_npz(npz, channel_axis=channel_axis)
    out = tmp_path / "chestmnist"
    path = materialise_chestmnist(npz, out)
    assert path == out / "datalist.json"
    dl = read_datalist(path)
    assert dl["labels"] == list(CHEST_XRAY14_LABELS)
    for prefix, split in (("train", "training"), ("val", "validation"), ("test", "test")):
        items = dl[split]
        assert len(items) == len(arrays[f"{prefix}_labels"])
        for i, item in enumerate(items):
            assert item["image"] == f"images/{prefix}/{i:06d}.png"
            assert item["patient"] == f"{prefix}-{i:06d}"
            assert item["label"] == arrays[f"{prefix}_labels"][i].tolist()
        with Image.open(out / items[-1]["image"]) as im:
            assert im.mode == "L"
            pixels = np.asarray(im)
        np.testing.assert_array_equal(pixels, arrays[f"{prefix}_images"][-1].reshape(28, 28))
    loaded = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key="training", base_dir=str(out))
    assert len(loaded) == 8 and all(Path(i["image"]).is_file() for i in loaded)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"val_labels": None}, "val_labels"),
        ({"test_labels": np.zeros((5, 14), np.uint8)}, "test_labels"),
        ({"train_labels": np.full((8, 14), 2, np.uint8)}, "train_labels"),
        ({"train_labels": np.zeros((8, 13), np.uint8)}, "train_labels"),
        ({"val_images": np.zeros((3, 28, 28), np.float32)}, "val_images"),
        ({"val_images": np.zeros((3, 28), np.uint8)}, "val_images"),
    ],
)
def test_materialise_chestmnist_bad_npz(tmp_path, override, match):
    npz = tmp_path / "chestmnist.npz"
    make_npz(npz, **override)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"chestmnist\.npz.*'{match}'"):
        materialise_chestmnist(npz, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["chestmnist.npz"]


@pytest.mark.parametrize("content", [b"this is not an npz", b"", None])
def test_materialise_chestmnist_not_npz(tmp_path, content):
    npz = tmp_path / "chestmnist.npz"
    if content is None:
        np.save(tmp_path / "chestmnist.npy", np.zeros(3))
        (tmp_path / "chestmnist.npy").rename(npz)
    else:
        npz.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"chestmnist\.npz"):
        materialise_chestmnist(npz, out)
    assert not out.exists()


def test_materialise_chestmnist_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        materialise_chestmnist(tmp_path / "nope.npz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_materialise_replaces_existing_only_on_success(tmp_path):
    npz = tmp_path / "chestmnist.npz"
    make_npz(npz)
    out = tmp_path / "out"
    materialise_chestmnist(npz, out)
    before = json.loads((out / "datalist.json").read_text())
    make_npz(npz, train_labels=np.full((8, 14), 3, np.uint8))
    with pytest.raises(InputError):
        materialise_chestmnist(npz, out)
    assert json.loads((out / "datalist.json").read_text()) == before
