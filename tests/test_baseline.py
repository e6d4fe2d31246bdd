"""Central baseline: trains the bundle on the pooled set and reports test AUC, pooled and per site."""

from __future__ import annotations

import json

import pytest

from monai_fl_ext.baseline import REPORT, run_central
from monai_fl_ext.errors import InputError


@pytest.mark.slow
def test_run_central_reports_pooled_per_label_and_per_site_auc(tiny_cohort, tmp_path):
    dataset_dir, datalist, partition_dir = tiny_cohort
    report = run_central("chest_xray_classification", dataset_dir, datalist, tmp_path, epochs=1,
                         partition_dir=partition_dir, overrides={"spatial_size": [32, 32], "batch_size": 16}, progress=False)
    on_disk = json.loads((tmp_path / REPORT).read_text())  # strict JSON: NaN would not parse back equal
    assert on_disk == report
    test = report["test"]
    assert test["n"] == len(json.loads(datalist.read_text())["test"])
    assert 0.0 <= test["macro_auc"] <= 1.0
    assert set(test["per_label_auc"]) == set(json.loads(datalist.read_text())["labels"])
    assert set(report["per_site_test"]) == {"site-1", "site-2", "site-3"}
    assert sum(r["n"] for r in report["per_site_test"].values()) == test["n"]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert list((tmp_path / "eval").glob("events.out.tfevents.*"))


def test_run_central_rejects_bad_epochs_and_unknown_bundle(tiny_cohort, tmp_path):
    dataset_dir, datalist, _ = tiny_cohort
    with pytest.raises(InputError, match="epochs"):
        run_central("chest_xray_classification", dataset_dir, datalist, tmp_path, epochs=0)
    with pytest.raises(InputError, match="no_such_bundle"):
        run_central("no_such_bundle", dataset_dir, datalist, tmp_path, epochs=1)
