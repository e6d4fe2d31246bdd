"""Federated training under real NVIDIA FLARE: simulator with a failing site, exported job folder, POC processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_SIZE

pytestmark = pytest.mark.slow


def _spec(tiny_cohort, out: Path, **kwargs):
    from monai_fl_ext.flare.job import FederatedJobSpec

    dataset_dir, _, partition_dir = tiny_cohort
    return FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(out), num_rounds=2, overrides={"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16},
                            wait_time_after_min_received=60, **kwargs)


def _load_into_bundle_network(path: Path) -> None:
    from monai_fl_ext.bundle import load_checkpoint
    from monai_fl_ext.networks import resnet18

    net = load_checkpoint(resnet18(), path)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_simulation_scaffold_three_sites_survives_a_failing_site_with_float16_updates(tiny_cohort, tmp_path):
    from monai_fl_ext.federated import run_federated

    _, datalist, _ = tiny_cohort
    spec = _spec(tiny_cohort, tmp_path / "fl", algorithm="scaffold", min_clients=2, faults={"sites": {"site-2": {"fail_rounds": [1]}}},
                 site_weights={"site-3": 2.0}, quantization="float16")
    report = run_federated(spec, datalist, mode="sim")
    assert report["status"] == "completed"
    first, second = report["rounds"]
    assert first["sites_ok"] == ["site-1", "site-2", "site-3"] and not first["sites_failed"]
    assert second["sites_ok"] == ["site-1", "site-3"]
    assert "injected failure at site-2, round 1" in second["sites_failed"]["site-2"]
    # weights: local steps times the explicit site weight
    history = json.loads((tmp_path / "fl" / "server" / "history.json").read_text())
    r0 = history["rounds"][0]
    assert r0["weights"]["site-3"] == pytest.approx(2.0 * r0["steps"]["site-3"])
    assert r0["weights"]["site-1"] == pytest.approx(r0["steps"]["site-1"])
    assert set(r0["update_norm"]) == {"site-1", "site-2", "site-3"} and len(r0["cosine"]) == 3
    assert all(b > 1_000_000 for b in r0["payload_bytes"].values())
    for site, sent in r0["wire_bytes"].items():  # measured on arrival, before dequantisation
        assert sent == pytest.approx(r0["payload_bytes"][site] / 2, rel=0.01)
    assert 0.0 <= report["test"]["macro_auc"] <= 1.0 and set(report["per_site_test"]) <= {"site-1", "site-2", "site-3"}
    matrix = report["cross_site"]["rows_model_columns_site"]
    assert set(matrix) == {"global", "site-1", "site-3"}  # local models of the sites aggregated in the last round
    server = tmp_path / "fl" / "server"
    for name in ("global", "site-1", "site-2", "site-3"):
        assert list((server / "tensorboard" / name).glob("events.out.tfevents.*")), name
    assert (server / "drift.png").stat().st_size > 0
    _load_into_bundle_network(server / "models" / "final_global_model.pt")
    assert list((tmp_path / "fl" / "sites" / "site-1" / "eval").glob("events.out.tfevents.*"))


def test_the_same_job_run_twice_publishes_bit_identical_global_models(tiny_cohort, tmp_path):
    """Sites answer in a different order each run; the server sums in site order, so a rerun reproduces the model."""
    from monai_fl_ext.federated import run_federated

    _, datalist, _ = tiny_cohort
    models = []
    for run in ("first", "second"):
        run_federated(_spec(tiny_cohort, tmp_path / run, cross_site_eval=False), datalist, mode="sim")
        models.append(torch.load(tmp_path / run / "server" / "models" / "final_global_model.pt", map_location="cpu"))
    first, second = models
    assert first.keys() == second.keys()
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, f"a rerun changed {differing[:5]}"


def test_exported_fedopt_job_runs_unchanged_in_nvflare_simulator(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import export_job

    spec = _spec(tiny_cohort, tmp_path / "fl", algorithm="fedopt", cross_site_eval=False, name="cxr_fedopt")
    job_dir = export_job(spec, tmp_path / "jobs")
    assert (job_dir / "meta.json").is_file()
    config = json.loads((job_dir / "app_server" / "config" / "config_fed_server.json").read_text())
    assert "FederatedBundleController" in json.dumps(config)
    nvflare = Path(sys.executable).with_name("nvflare")
    result = subprocess.run([str(nvflare), "simulator", "-w", str(tmp_path / "ws"), "-c", "site-1,site-2,site-3", "-t", "3",
                             str(job_dir)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((tmp_path / "fl" / "server" / "history.json").read_text())
    assert history["status"] == "completed" and history["config"]["algorithm"] == "fedopt"
    assert [r["sites_ok"] for r in history["rounds"]] == [["site-1", "site-2", "site-3"]] * 2
    _load_into_bundle_network(tmp_path / "fl" / "server" / "models" / "final_global_model.pt")


def _processes_using(path: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(path) in line]


def test_poc_mode_real_processes_fedprox_with_client_level_dp_and_no_process_left(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import run_poc

    spec = _spec(tiny_cohort, tmp_path / "fl", algorithm="fedprox", cross_site_eval=False, name="cxr_poc",
                 client_dp={"clip": 5.0, "noise_multiplier": 1.0, "delta": 1e-5})
    server = run_poc(spec, timeout=900)
    history = json.loads((server / "history.json").read_text())
    assert history["status"] == "completed" and history["config"]["algorithm"] == "fedprox"
    assert all(r["sites_ok"] == ["site-1", "site-2", "site-3"] for r in history["rounds"])
    client_eps = [r["client_dp"]["epsilon"] for r in history["rounds"]]  # DP-FedAvg at the server, composed over rounds
    assert 0 < client_eps[0] < client_eps[1]
    assert all(w == 1.0 for w in history["rounds"][0]["weights"].values())
    assert not _processes_using(tmp_path / "fl" / "poc_workspace")  # server and site processes were stopped
    assert not (tmp_path / "fl" / "poc_workspace").exists()
