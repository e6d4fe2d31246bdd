"""Secure aggregation under real FLARE: simulation with DP and a site dropping after setup, POC processes, job export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY_SIZE


def _spec(tiny_cohort, out: Path, **kwargs):
    from monai_fl_ext.flare.job import FederatedJobSpec

    dataset_dir, _, partition_dir = tiny_cohort
    return FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(out), num_rounds=2, overrides={"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16},
                            wait_time_after_min_received=60, **{"secure_aggregation": {}, **kwargs})


def test_secure_job_exports_the_secure_aggregate_workflow_with_all_its_arguments(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import export_job

    spec = _spec(tiny_cohort, tmp_path / "fl", secure_aggregation={"bits": 64, "threshold": 3}, min_clients=3, name="secure")
    config = json.loads((export_job(spec, tmp_path / "jobs") / "app_server" / "config" / "config_fed_server.json").read_text())
    workflow = next(w for w in config["workflows"] if "SecureAggregateController" in w["path"])
    assert workflow["args"]["secure_aggregation"]["bits"] == 64 and workflow["args"]["secure_aggregation"]["threshold"] == 3
    assert workflow["args"]["output_dir"] == str((tmp_path / "fl" / "server").resolve()) and workflow["args"]["min_clients"] == 3


@pytest.mark.parametrize("kwargs,match", [
    ({"algorithm": "scaffold"}, "cannot be combined with .*scaffold"),
    ({"client_dp": {"clip": 1.0, "noise_multiplier": 1.0}}, "cannot be combined with .*client_dp"),
    ({"quantization": "float16"}, "cannot be combined with .*quantization"),
    ({"secure_aggregation": {"threshold": 4}}, "threshold must be between 2 and the 3 sites"),
    ({"secure_aggregation": {"bits": 16}}, "bits must be one of"),
    ({"secure_aggregation": {"rounds": 2}}, "unknown secure_aggregation settings"),
])
def test_secure_job_refuses_settings_it_cannot_honour(tiny_cohort, tmp_path, kwargs, match):
    from monai_fl_ext.errors import InputError

    with pytest.raises(InputError, match=match):
        _spec(tiny_cohort, tmp_path, **kwargs).validate()


@pytest.mark.slow
def test_simulation_with_dp_sgd_and_a_site_dropping_after_key_setup(tiny_cohort, tmp_path):
    from monai_fl_ext.federated import run_federated

    _, datalist, _ = tiny_cohort
    spec = _spec(tiny_cohort, tmp_path / "fl", min_clients=2, faults={"sites": {"site-2": {"fail_rounds": [1]}}}, privacy={"target_epsilon": 8.0})
    report = run_federated(spec, datalist, mode="sim")
    assert report["status"] == "completed"
    history = json.loads((tmp_path / "fl" / "server" / "history.json").read_text())
    assert history["config"]["secure_aggregation"]["bits"] == 32
    first, second = history["rounds"]
    assert first["aggregated"] and second["aggregated"]
    assert first["secure_aggregation"]["contributors"] == ["site-1", "site-2", "site-3"]
    assert first["secure_aggregation"]["error_bound"] < 1e-3 and first["secure_aggregation"]["total_weight"] > 0
    # site-2 advertised keys and shared them, then failed in training: its pairwise masks were removed via Shamir
    assert second["secure_aggregation"]["contributors"] == ["site-1", "site-3"]
    assert second["secure_aggregation"]["dropped"] == ["site-2"]
    assert "injected failure at site-2, round 1" in second["sites_failed"]["site-2"]
    assert first["weights"] == {} and "cosine" not in first  # the server never saw a single site's update
    assert set(first["update_norm"]) == {"site-1", "site-2", "site-3"}  # norms the sites report about themselves
    assert 7.0 < max(p["epsilon"] for p in second["privacy"].values()) <= 8.0 + 1e-6
    assert set(report["cross_site"]["rows_model_columns_site"]) == {"global"}
    assert 0.0 <= report["test"]["macro_auc"] <= 1.0


@pytest.mark.slow
def test_poc_mode_real_processes_with_secure_aggregation(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import run_poc

    spec = _spec(tiny_cohort, tmp_path / "fl", cross_site_eval=False, name="cxr_secure_poc", secure_aggregation={"bits": 64})
    history = json.loads((run_poc(spec, timeout=900) / "history.json").read_text())
    assert history["status"] == "completed"
    for r in history["rounds"]:
        assert r["aggregated"] and r["secure_aggregation"]["contributors"] == ["site-1", "site-2", "site-3"]
        assert r["secure_aggregation"]["bits"] == 64 and r["secure_aggregation"]["error_bound"] < 1e-9


def test_cli_secure_agg_flags_reach_the_job_spec(tiny_cohort, tmp_path):
    from monai_fl_ext.cli import _job_spec, build_parser

    dataset_dir, datalist, partition_dir = tiny_cohort
    base = ["federated", "--dataset-dir", str(dataset_dir), "--datalist", str(datalist), "--partition", str(partition_dir),
            "--out", str(tmp_path)]
    assert _job_spec(build_parser().parse_args(base)).secure_aggregation is None
    spec = _job_spec(build_parser().parse_args([*base, "--secure-agg", "--secagg-bits", "64", "--secagg-threshold", "3"]))
    assert spec.secure_aggregation == {"bits": 64, "clip_range": 8.0, "max_weight": 4096.0, "threshold": 3}
    spec.validate()
