"""Tests for monai_fl_ext.partition: patient integrity, skew behaviour, reproducibility, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_fl_ext import __version__
from monai_fl_ext.data.datalist import CHEST_XRAY14_LABELS, NO_FINDING, SPLITS, read_datalist, write_datalist
from monai_fl_ext.errors import InputError
from monai_fl_ext.io import sha256_file
from monai_fl_ext.partition import (
    label_histograms,
    load_manifest,
    partition_datalist,
    primary_classes,
    read_site_datalist,
    write_partition,
)

LABELS = list(CHEST_XRAY14_LABELS)
HOSPITALS = ("hospital-b", "hospital-a", "hospital-c")


def make_datalist(num_patients: int = 60, images_per_patient: int = 2, seed: int = 0) -> dict:
    """Synthetic datalist: skewed label prevalence, a few patients spanning splits, some items without a patient."""
    rng = np.random.default_rng(seed)
    prevalence = 0.35 * 0.75 ** np.arange(len(LABELS))
    datalist = {"labels": LABELS, "training": [], "validation": [], "test": []}
    for p in range(num_patients):
        split = SPLITS[0] if p < 0.7 * num_patients else SPLITS[1 + p % 2]
        for i in range(images_per_patient):
            item = {
                "image": f"images/p{p:03d}_{i}.png",
                "label": (rng.random(len(LABELS)) < prevalence).astype(int).tolist(),
                "patient": f"p{p:03d}",
                "site": HOSPITALS[p % len(HOSPITALS)],
            }
            # Every fifth patient has an image in another split, to check patients are kept whole across splits.
            item_split = "validation" if p % 5 == 0 and i == images_per_patient - 1 else split
            datalist[item_split].append(item)
    for i in range(4):  # items without a patient are their own patients
        datalist["training"].append({"image": f"images/anon_{i}.png", "label": [0] * len(LABELS), "site": "hospital-a"})
    return datalist


def site_of_items(sites: dict) -> dict[str, str]:
    """image -> site, asserting every image appears in exactly one site."""
    found: dict[str, str] = {}
    for name, site in sites.items():
        for split in SPLITS:
            for item in site[split]:
                assert item["image"] not in found, f"{item['image']} in {found[item['image']]} and {name}"
                found[item["image"]] = name
    return found


def mean_label_tv_distance(sites: dict) -> float:
    """Mean total-variation distance between each site's training label distribution and the overall one."""
    histograms = label_histograms(sites, LABELS)
    counts = np.array([[h["training"]["label_counts"][c] for c in [*LABELS, NO_FINDING]] for h in histograms.values()])
    overall = counts.sum(axis=0) / counts.sum()
    per_site = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(per_site - overall).sum(axis=1)))


@pytest.fixture(scope="module")
def datalist() -> dict:
    return make_datalist()


@pytest.fixture()
def datalist_file(tmp_path: Path, datalist: dict) -> Path:
    return write_datalist(tmp_path / "datalist.json", datalist)


@pytest.mark.parametrize("strategy", ["iid", "dirichlet", "quantity", "natural"])
def test_every_item_assigned_once_and_patients_kept_whole(datalist: dict, strategy: str) -> None:
    sites = partition_datalist(datalist, 3, strategy=strategy, alpha=0.5, seed=1)
    item_site = site_of_items(sites)
    assert len(item_site) == sum(len(datalist[s]) for s in SPLITS)
    patient_sites: dict[str, set[str]] = {}
    for split in SPLITS:
        for item in datalist[split]:
            patient_sites.setdefault(item.get("patient", item["image"]), set()).add(item_site[item["image"]])
    assert all(len(s) == 1 for s in patient_sites.values())
    for site in sites.values():  # split membership, order and content are kept
        assert site["labels"] == LABELS
        for split in SPLITS:
            assert site[split] == [item for item in datalist[split] if item in site[split]]
            assert all(item in datalist[split] for item in site[split])


def test_input_not_modified_and_outputs_are_copies(datalist: dict) -> None:
    before = json.dumps(datalist, sort_keys=True)
    sites = partition_datalist(datalist, 4, strategy="iid")
    sites["site-1"]["training"][0]["label"][0] = 7
    assert json.dumps(datalist, sort_keys=True) == before


def test_iid_sites_are_balanced(datalist: dict) -> None:
    sites = partition_datalist(datalist, 4, strategy="iid", seed=3)
    assert list(sites) == ["site-1", "site-2", "site-3", "site-4"]
    patients = [len({i.get("patient", i["image"]) for s in SPLITS for i in site[s]}) for site in sites.values()]
    assert max(patients) - min(patients) <= 1


def test_primary_class_is_rarest_positive_label() -> None:
    labels = ["A", "B", "C"]
    datalist = {
        "labels": labels,
        "training": [
            {"image": "1", "label": [1, 1, 0], "patient": "x"},  # A is positive on 3 items, B on 2
            {"image": "2", "label": [1, 0, 0], "patient": "y"},
            {"image": "3", "label": [0, 0, 0], "patient": "z"},
            {"image": "4", "label": [0, 0, 1], "patient": "w"},  # C on 2 items ties B: lower index wins
        ],
        "test": [
            {"image": "5", "label": [1, 0, 0], "patient": "v"},
            {"image": "6", "label": [0, 1, 1], "patient": "w"},
            {"image": "7", "label": [0, 0, 0]},
        ],
    }
    assert primary_classes(datalist) == {"x": "B", "y": "A", "z": NO_FINDING, "w": "B", "v": "A", "7": NO_FINDING}


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    datalist = make_datalist(num_patients=200)  # enough patients that alpha=100 is close to iid

    def skew(alpha: float) -> float:
        return np.mean([mean_label_tv_distance(partition_datalist(datalist, 4, alpha=alpha, seed=s)) for s in range(5)])

    assert skew(0.1) > 2 * skew(100.0)


def test_quantity_skew_varies_site_sizes(datalist: dict) -> None:
    def size_spread(strategy: str) -> float:
        spreads = []
        for seed in range(5):
            sizes = [len(site["training"]) for site in partition_datalist(datalist, 4, strategy, 0.5, seed).values()]
            spreads.append(max(sizes) - min(sizes))
        return float(np.mean(spreads))

    assert size_spread("quantity") > 2 * size_spread("iid")


def test_min_site_size_is_respected(datalist: dict) -> None:
    for seed in range(3):
        sites = partition_datalist(datalist, 4, "dirichlet", alpha=0.1, seed=seed, min_site_size=10)
        assert min(len(site["training"]) for site in sites.values()) >= 10


def test_natural_strategy_uses_field_values(datalist: dict) -> None:
    sites = partition_datalist(datalist, None, strategy="natural")
    assert list(sites) == sorted(HOSPITALS)
    assert partition_datalist(datalist, 3, strategy="natural") == sites
    for name, site in sites.items():
        assert all(item["site"] == name for split in SPLITS for item in site[split])


def test_histograms_count_labels(datalist: dict) -> None:
    sites = partition_datalist(datalist, 2, strategy="iid")
    histograms = label_histograms(sites, LABELS)
    for split in SPLITS:
        assert sum(h[split]["items"] for h in histograms.values()) == len(datalist[split])
        for k, label in enumerate(LABELS):
            total = sum(h[split]["label_counts"][label] for h in histograms.values())
            assert total == sum(item["label"][k] for item in datalist[split])
        no_finding = sum(h[split]["label_counts"][NO_FINDING] for h in histograms.values())
        assert no_finding == sum(not any(item["label"]) for item in datalist[split])


def test_write_partition_is_byte_reproducible(tmp_path: Path, datalist_file: Path, datalist: dict) -> None:
    args = dict(num_sites=3, strategy="dirichlet", alpha=0.5, seed=7, min_site_size=2)
    first = write_partition(datalist_file, tmp_path / "a", **args)
    second = write_partition(datalist_file, tmp_path / "b", **args)
    files = sorted(p.name for p in first.iterdir())
    assert files == ["histograms.json", "histograms.png", "manifest.json", "site-1.json", "site-2.json", "site-3.json"]
    assert files == sorted(p.name for p in second.iterdir())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "histograms.png").read_bytes().startswith(b"\x89PNG")

    manifest = load_manifest(first)
    assert manifest["input"] == {"datalist": str(datalist_file), "sha256": sha256_file(datalist_file)}
    assert manifest["tool"]["version"] == __version__
    assert manifest["spec"] == {**args, "field": None, "alpha": 0.5}
    assert manifest["name"] == "dirichlet-3sites-alpha0.5-seed7"
    assert [s["name"] for s in manifest["sites"]] == ["site-1", "site-2", "site-3"]
    assert sum(s["items"]["training"] for s in manifest["sites"]) == len(datalist["training"])
    site = read_site_datalist(first, "site-2")
    assert site == read_datalist(first / "site-2.json")
    assert site["training"] == partition_datalist(datalist, **args)["site-2"]["training"]
    with pytest.raises(InputError, match="site-9"):
        read_site_datalist(first, "site-9")


def test_different_seed_gives_different_assignment(datalist: dict) -> None:
    for strategy in ("iid", "dirichlet", "quantity"):
        a = site_of_items(partition_datalist(datalist, 3, strategy, seed=0))
        b = site_of_items(partition_datalist(datalist, 3, strategy, seed=1))
        assert a != b, strategy


def without_site_field() -> dict:
    datalist = make_datalist()
    del datalist["validation"][2]["site"]
    return datalist


def patients_mostly_without_training() -> dict:
    datalist = make_datalist(num_patients=6)
    datalist["test"] += datalist["training"][2:]
    datalist["training"] = datalist["training"][:2]
    return datalist


BAD_INPUTS = {
    "alpha zero": (None, dict(alpha=0.0), "alpha"),
    "alpha negative": (None, dict(alpha=-1.0), "alpha"),
    "alpha nan": (None, dict(alpha=float("nan")), "alpha"),
    "no sites": (None, dict(num_sites=0), "num_sites"),
    "more sites than patients": (None, dict(num_sites=500), r"num_sites=500 but datalist has only \d+ patients"),
    "impossible min_site_size": (None, dict(min_site_size=1000), "min_site_size"),
    "negative min_site_size": (None, dict(min_site_size=-1), "min_site_size"),
    "empty site": (patients_mostly_without_training, dict(strategy="iid", num_sites=4), "site 'site-"),
    "unknown strategy": (None, dict(strategy="round-robin"), "strategy"),
    "natural missing field": (
        without_site_field,
        dict(strategy="natural", num_sites=None),
        r"field='site'.*validation\[2\]",
    ),
    "natural wrong num_sites": (None, dict(strategy="natural", num_sites=2), "num_sites=2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_writes_nothing(tmp_path: Path, datalist: dict, case: str) -> None:
    make, overrides, message = BAD_INPUTS[case]
    path = write_datalist(tmp_path / "in" / "datalist.json", make() if make else datalist)
    args = {"num_sites": 3, "strategy": "dirichlet", "alpha": 0.5, "seed": 0, "min_site_size": 1, **overrides}

    with pytest.raises(InputError, match=message):
        write_partition(path, tmp_path / "out" / "new", **args)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "site-1.json").write_text("keep me")
    with pytest.raises(InputError, match=message):
        write_partition(path, existing, **args)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in existing.iterdir()] == ["site-1.json"]
    assert (existing / "site-1.json").read_text() == "keep me"


def test_committed_demo_partition_regenerates_byte_for_byte(tmp_path, monkeypatch):
    """The partition under partitions/ is what the demo's generator and partition tool produce, file for file."""
    from monai_fl_ext.data.synthetic import SyntheticSpec
    from monai_fl_ext.demo import prepare_synthetic

    committed = Path(__file__).resolve().parents[1] / "partitions" / "synthetic-cxr-500p-64px-dirichlet-0.5-3sites-seed0"
    monkeypatch.chdir(tmp_path)  # same relative paths as `make demo`, so the manifest's recorded input path matches
    spec = SyntheticSpec(num_patients=500, image_size=64, num_hospitals=3, seed=0)
    _, _, fresh = prepare_synthetic("workspace/demo", spec, 3, 0.5, progress=False, partition_dir=Path("partitions") / committed.name)
    names = sorted(p.name for p in committed.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    for name in names:
        assert (committed / name).read_bytes() == (fresh / name).read_bytes(), name
