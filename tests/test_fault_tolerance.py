"""Faults under real FLARE: poisoned updates rejected, a site with bad data sitting out, sampled rounds, version policy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SIZE


def _spec(dataset_dir, partition_dir, out: Path, **kwargs):
    from monai_fl_ext.flare.job import FederatedJobSpec

    return FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(out), num_rounds=2, overrides={"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16},
                            wait_time_after_min_received=60, cross_site_eval=False, **kwargs)


def _final_is_finite(server: Path) -> bool:
    state = torch.load(server / "models" / "final_global_model.pt")
    return all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.slow
def test_poisoned_updates_are_rejected_and_every_published_model_is_finite(tiny_cohort, tmp_path):
    from monai_fl_ext.federated import run_federated

    dataset_dir, datalist, partition_dir = tiny_cohort
    faults = {"sites": {"site-2": {"poison": {"0": "nan"}}, "site-3": {"poison": {"1": "scale"}}}}
    report = run_federated(_spec(dataset_dir, partition_dir, tmp_path / "fl", min_clients=2, faults=faults), datalist, mode="sim")
    assert report["status"] == "completed"
    history = json.loads((tmp_path / "fl" / "server" / "history.json").read_text())
    first, second = history["rounds"]
    assert first["aggregated"] and first["sites_ok"] == ["site-1", "site-3"]
    assert "non-finite" in first["sites_rejected"]["site-2"]
    assert second["aggregated"] and second["sites_ok"] == ["site-1", "site-2"]
    assert "exceeds 100x the median of the other sites' norms" in second["sites_rejected"]["site-3"]
    assert _final_is_finite(tmp_path / "fl" / "server")


@pytest.mark.slow
def test_a_site_with_bad_data_sits_out_and_sampled_rounds_are_recorded(tiny_cohort, tmp_path):
    from monai_fl_ext.federated import run_federated

    dataset_dir, datalist, partition_dir = tiny_cohort
    broken = tmp_path / "partition"
    shutil.copytree(partition_dir, broken)
    site3 = json.loads((broken / "site-3.json").read_text())
    site3["training"][0]["image"] = "images_001/images/does_not_exist.png"
    (broken / "site-3.json").write_text(json.dumps(site3))
    spec = _spec(dataset_dir, broken, tmp_path / "fl", min_clients=1, clients_per_round=2, aggregator="median")
    report = run_federated(spec, datalist, mode="sim")
    assert report["status"] == "completed"
    history = json.loads((tmp_path / "fl" / "server" / "history.json").read_text())
    for record in history["rounds"]:
        assert len(record["scheduled"]) == 2 and record["available"] == ["site-1", "site-2", "site-3"]
        assert record["aggregated"] and "site-3" not in record["sites_ok"]
        if "site-3" in record["scheduled"]:
            assert "site-3: site-3.json training[0]: images_001/images/does_not_exist.png: file not found" in record["sites_failed"]["site-3"]
    assert history["config"]["aggregator"] == "median"
    assert _final_is_finite(tmp_path / "fl" / "server")


def test_version_policy_refuses_or_warns_naming_both_versions():
    from nvflare.app_common.abstract.fl_model import FLModel

    from monai_fl_ext.flare.controller import FederatedBundleController

    expected = {"monai": "1.6.1", "bundle_version": "0.2.0"}
    result = FLModel(params={}, meta={"client_name": "site-2", "versions": {"monai": "1.5.0", "bundle_version": "0.2.0"}})
    refuse = FederatedBundleController(expected_versions=expected)
    refuse.current_round = 4
    assert refuse._check_versions(result) == "software differs from the job's: monai: site 1.5.0, job 1.6.1"
    warned = []
    warn = FederatedBundleController(expected_versions=expected, version_policy="warn")
    warn.current_round, warn.warning = 4, warned.append
    assert warn._check_versions(result) is None and "accepted: version_policy=warn" in warned[0]
    assert FederatedBundleController(expected_versions=expected, version_policy="ignore")._check_versions(result) is None


def test_sampling_deprioritises_sites_that_failed():
    from monai_fl_ext.flare.controller import FederatedBundleController

    ctl = FederatedBundleController(clients_per_round=2, min_clients=1)
    ctl._misses = {"site-3": 20}
    counts = {"site-1": 0, "site-2": 0, "site-3": 0}
    for ctl.current_round in range(300):
        for s in ctl._schedule(["site-1", "site-2", "site-3"]):
            counts[s] += 1
    assert counts["site-3"] < 0.25 * counts["site-1"] and counts["site-1"] + counts["site-2"] + counts["site-3"] == 600
    assert np.isclose(counts["site-1"], counts["site-2"], rtol=0.2)


@pytest.mark.slow
def test_server_crash_mid_job_resumes_from_the_checkpoint_keeping_privacy_and_audit_state(tiny_cohort, tmp_path):
    from monai_fl_ext.governance import verify_trail
    from monai_fl_ext.governance.audit import read_records
    from monai_fl_ext.stress import run_stress

    dataset_dir, datalist, partition_dir = tiny_cohort
    spec = _spec(dataset_dir, partition_dir, tmp_path / "stress", privacy={"target_epsilon": 8.0})
    spec.num_rounds = 3
    result = run_stress("restart", spec, datalist, baseline=False)
    faulty = result["faulty"]
    assert faulty["status"] == "completed" and faulty["rounds_completed"] == 3 and faulty["resumed_at_round"] == [1]
    assert faulty["published_models_finite"] and 0 <= faulty["final_model_test_macro_auc"] <= 1
    server = tmp_path / "stress" / "faulty" / "server"
    history = json.loads((server / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]  # round 0 from before the crash, 1-2 after it
    eps = [max(p["epsilon"] for p in r["privacy"].values()) for r in history["rounds"]]
    assert eps[0] < eps[1] < eps[2] <= 8.0 + 1e-6  # the sites' accountants continued across the restart
    trail = server / "governance" / "audit_trail.jsonl"
    assert verify_trail(trail).ok
    events = [r["event"] for r in read_records(trail)]
    assert "server_crash_injected" in events and "job_resumed" in events and events[-1] == "job_end"
    assert events.count("aggregated") == 3


@pytest.mark.slow  # 136 s on a quiet 2-core machine, 258 s under load
def test_poc_site_killed_mid_round_restarted_two_rounds_later_rejoins_with_its_privacy_accountant(tiny_cohort, tmp_path):
    """Real POC processes: site-2's process tree is SIGKILLed while training round 1 and started with its start.sh in round 3."""
    import psutil

    from monai_fl_ext.flare.site_restart import SiteRestartPlan
    from monai_fl_ext.governance import verify_trail
    from monai_fl_ext.governance.audit import read_records
    from monai_fl_ext.stress import run_site_restart

    dataset_dir, datalist, partition_dir = tiny_cohort
    spec = _spec(dataset_dir, partition_dir, tmp_path / "stress", privacy={"noise_multiplier": 1.0}, name="site_restart")
    spec.num_rounds = 4

    result = run_site_restart(spec, datalist, baseline=False, plan=SiteRestartPlan("site-2", kill_round=1, restart_after_rounds=2))
    faulty = result["faulty"]
    assert [j.split(": ")[1] for j in faulty["jobs"]] == ["FINISHED:ABORTED", "FINISHED:COMPLETED"]  # handover, then resumed
    assert faulty["status"] == "completed" and faulty["rounds_completed"] == 4 and faulty["resumed_at_round"] == [3]
    assert faulty["killed_in_round"] == 1 and faulty["restarted_in_round"] == 3
    per_round = {int(k): v for k, v in faulty["sites_per_round"].items()}
    assert per_round == {0: ["site-1", "site-2", "site-3"], 1: ["site-1", "site-3"], 2: ["site-1", "site-3"],
                         3: ["site-1", "site-2", "site-3"]}
    assert faulty["missed_rounds"] == [1, 2] and faulty["rejoined"] and faulty["published_models_finite"]
    server = tmp_path / "stress" / "faulty" / "server"
    history = json.loads((server / "history.json").read_text())
    assert "no answer within the round" in history["rounds"][1]["sites_failed"]["site-2"]
    # the restarted site's epsilon continued from its persisted accountant: after round 3 it counts round 0's steps and
    # round 3's (and round 1's when the kill came after its local steps were recorded); a fresh one would count round 3's only
    eps = {int(k): v for k, v in faulty["site_epsilon"].items()}
    assert 0 < eps[0] < eps[3]
    p0, p3 = history["rounds"][0]["privacy"]["site-2"], history["rounds"][3]["privacy"]["site-2"]
    assert p3["steps"] >= p0["steps"] + history["rounds"][3]["steps"]["site-2"]
    accountant = json.loads((tmp_path / "stress" / "faulty" / "sites" / "site-2" / "privacy_accountant.json").read_text())
    assert accountant["steps"] == p3["steps"]
    trail = server / "governance" / "audit_trail.jsonl"
    assert verify_trail(trail).ok
    events = [r["event"] for r in read_records(trail)]
    assert "job_resumed" in events and events[-1] == "job_end" and events.count("aggregated") == 4
    poc = str(tmp_path / "stress" / "faulty" / "poc_workspace")
    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if any(poc in a for a in p.info["cmdline"] or [])]


def test_repeated_stress_needs_two_seeds_and_a_simulator_scenario(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import FederatedJobSpec
    from monai_fl_ext.stress import run_stress_repeated, scenario_plan

    dataset_dir, datalist, partition_dir = tiny_cohort
    spec = FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "stress"))
    for repeats, scenario in ((1, "dropouts"), (3, "site-restart")):
        with pytest.raises(ValueError, match="repeats >= 2 and a simulator scenario"):
            run_stress_repeated(scenario, spec, datalist, repeats)
    # each seed draws its own faults: the plans differ only in their seed, so the draws differ by seed
    assert scenario_plan("dropouts", 10, 8, seed=1)[0]["seed"] == 1 != scenario_plan("dropouts", 10, 8, seed=2)[0]["seed"]
