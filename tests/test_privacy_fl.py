"""DP-SGD through the ClientAlgo and under FLARE: accounting across rounds and restarts, budgets, target epsilon."""

from __future__ import annotations

import json

import pytest

from conftest import BUNDLE, TINY_SIZE


def _algo(tiny_cohort, tiny_overrides, tmp_path, privacy):
    from monai.fl.utils.constants import ExtraItems

    from monai_fl_ext.algo import FederatedBundleAlgo

    _, _, partition_dir = tiny_cohort
    overrides = {**tiny_overrides, "norm": "group", "datalist": str(partition_dir / "site-1.json"),
                 "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")}
    algo = FederatedBundleAlgo(BUNDLE, overrides, privacy=privacy, privacy_state=tmp_path / "accountant.json")
    algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-1", ExtraItems.APP_ROOT: ""})
    return algo


def _round(algo, current_round, total_rounds=3):
    from monai.fl.utils.constants import WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    weights = {k: v.detach().clone() for k, v in algo.trainer.network.state_dict().items()}
    algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS),
               extra={"meta": {"current_round": current_round, "total_rounds": total_rounds}})
    return algo.get_weights()


def test_accountant_persists_across_restarts_and_budget_refuses_without_spending(tiny_cohort, tiny_overrides, tmp_path):
    from monai_fl_ext.privacy import BudgetExceeded, DPSettings, opacus_rdp_epsilon

    settings = DPSettings(noise_multiplier=1.0, delta=1e-3, budget_epsilon=50.0)
    algo = _algo(tiny_cohort, tiny_overrides, tmp_path, settings)
    update = _round(algo, 0)
    assert all(not k.startswith("_module.") for k in update.weights)  # exchanged keys stay plain under Opacus
    first = algo.round_meta["privacy"]
    assert first["steps"] == algo.round_steps() > 0 and first["epsilon"] > 0
    assert first["epsilon"] == pytest.approx(opacus_rdp_epsilon(1.0, first["sample_rate"], first["steps"], 1e-3), rel=1e-6)
    algo.finalize()

    restarted = _algo(tiny_cohort, tiny_overrides, tmp_path, settings)  # a new process: state comes from the file
    assert restarted.accountant.steps == first["steps"]
    _round(restarted, 1)
    second = restarted.round_meta["privacy"]
    assert second["steps"] == 2 * first["steps"] and second["epsilon"] > first["epsilon"]

    tight = _algo(tiny_cohort, tiny_overrides, tmp_path, DPSettings(noise_multiplier=1.0, delta=1e-3, budget_epsilon=second["epsilon"] + 1e-3))
    with pytest.raises(BudgetExceeded, match="site-1, round 2"):
        _round(tight, 2)
    assert tight.accountant.steps == second["steps"]  # refused rounds spend nothing
    state = json.loads((tmp_path / "accountant.json").read_text())
    assert state["steps"] == second["steps"]


def test_bundle_with_batch_norm_is_refused_for_dp(tiny_cohort, tiny_overrides, tmp_path):
    from monai.fl.utils.constants import ExtraItems

    from monai_fl_ext.algo import FederatedBundleAlgo
    from monai_fl_ext.privacy import DPSettings

    _, _, partition_dir = tiny_cohort
    overrides = {**tiny_overrides, "datalist": str(partition_dir / "site-1.json"), "ckpt_dir": str(tmp_path / "m"), "output_dir": str(tmp_path / "e")}
    algo = FederatedBundleAlgo(BUNDLE, overrides, privacy=DPSettings(noise_multiplier=1.0, delta=1e-3))
    with pytest.raises(ValueError, match="norm=group"):
        algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-1", ExtraItems.APP_ROOT: ""})


@pytest.mark.slow
def test_federated_dp_reaches_target_epsilon_over_the_planned_rounds(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import FederatedJobSpec, run_simulation

    dataset_dir, _, partition_dir = tiny_cohort
    spec = FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "fl"), num_rounds=2, cross_site_eval=False, wait_time_after_min_received=60,
                            overrides={"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16},
                            privacy={"target_epsilon": 8.0, "delta": 1e-3})
    history = json.loads((run_simulation(spec, progress=False) / "history.json").read_text())
    assert history["status"] == "completed"
    eps = [r["max_epsilon"] for r in history["rounds"]]
    assert eps[0] < eps[1] <= 8.0 + 1e-6 and eps[1] > 7.5  # noise derived for the whole run, spent over it
    for site, p in history["rounds"][-1]["privacy"].items():
        assert p["delta"] == 1e-3 and p["max_grad_norm"] == 1.0 and p["noise_multiplier"] > 0, site
        assert p["grad_sample_mode"] == "mixed_ghost", site  # the fast per-sample clipping is the federated default
    assert (tmp_path / "fl" / "sites" / "site-1" / "privacy_accountant.json").is_file()
    assert (tmp_path / "fl" / "server" / "privacy.png").stat().st_size > 0


@pytest.mark.slow
def test_privacy_sweep_writes_curve_with_settings_per_point(tiny_cohort, tmp_path):
    import csv

    from monai_fl_ext.federated import run_privacy_sweep
    from monai_fl_ext.flare.job import FederatedJobSpec

    dataset_dir, datalist, partition_dir = tiny_cohort
    spec = FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "sweep"), num_rounds=1, cross_site_eval=False, wait_time_after_min_received=60,
                            overrides={"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16, "seed": 5})
    rows = run_privacy_sweep(spec, datalist, [1.5], target_epsilon=None, delta=1e-3, progress=False)
    assert [r["run"] for r in rows] == ["non-private", "noise-1.5"]
    assert rows[0]["epsilon"] is None and rows[1]["epsilon"] > 0 and rows[1]["noise_multiplier"] == "1.5000"
    on_disk = list(csv.DictReader((tmp_path / "sweep" / "privacy_utility.csv").open()))
    assert [r["run"] for r in on_disk] == ["non-private", "noise-1.5"] and all(r["seed"] == "5" for r in on_disk)
    assert (tmp_path / "sweep" / "privacy_utility.png").stat().st_size > 0


def test_fedprox_still_pulls_towards_the_global_model_under_dp_sgd(tiny_cohort, tiny_overrides, tmp_path):
    import torch
    from monai.fl.utils.constants import ExtraItems

    from monai_fl_ext.algo import FederatedBundleAlgo
    from monai_fl_ext.algorithms import FedProxTerm
    from monai_fl_ext.privacy import DPSettings

    _, _, partition_dir = tiny_cohort
    drift = {}
    for mu in (0.0, 500.0):  # lr 1e-3 x mu 500: each step pulls half-way back to the global model
        overrides = {**tiny_overrides, "norm": "group", "datalist": str(partition_dir / "site-1.json"), "seed": 1,
                     "ckpt_dir": str(tmp_path / f"m{mu}"), "output_dir": str(tmp_path / f"e{mu}")}
        algo = FederatedBundleAlgo(BUNDLE, overrides, local_term=FedProxTerm(mu),
                                   privacy=DPSettings(noise_multiplier=0.0, delta=1e-3), privacy_state=tmp_path / f"a{mu}.json")
        algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-1", ExtraItems.APP_ROOT: ""})
        update = _round(algo, 0)
        drift[mu] = float(torch.sqrt(sum((v.float() ** 2).sum() for v in update.weights.values())))
        algo.finalize()
    assert drift[500.0] < 0.7 * drift[0.0]  # the proximal step survives DP-SGD's gradient replacement


def _pretrained_stand_in(path, overrides, seed=123):
    """A checkpoint of the bundle's network with other weights than the job's seeded start, saved as Opacus would."""
    import torch

    from monai_fl_ext.bundle import resolve_bundle
    from monai_fl_ext.flare.network import build_bundle_network

    network = build_bundle_network(str(resolve_bundle("chest_xray_classification")), {**overrides, "seed": seed})
    state = {f"_module.{k}": v for k, v in network.state_dict().items()}
    torch.save({"model": state}, path)
    return {k.removeprefix("_module."): v for k, v in state.items()}


def test_initial_checkpoint_that_does_not_fit_the_network_is_refused_naming_the_keys(tiny_cohort, tmp_path):
    from monai_fl_ext.errors import InputError
    from monai_fl_ext.flare.job import FederatedJobSpec

    dataset_dir, _, partition_dir = tiny_cohort
    _pretrained_stand_in(tmp_path / "batchnorm.pt", {"norm": "batch"})
    spec = FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "fl"), privacy={"noise_multiplier": 1.0, "delta": 1e-3},
                            initial_checkpoint=str(tmp_path / "batchnorm.pt"))
    with pytest.raises(InputError, match=r"batchnorm\.pt does not fit .*unexpected .*running_mean"):
        spec.validate()  # DP switches the job to GroupNorm; a BatchNorm checkpoint has running statistics
    spec.initial_checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="missing.pt: model file not found"):
        spec.validate()


@pytest.mark.slow
def test_dp_fine_tuning_starts_every_site_from_the_initial_checkpoint(tiny_cohort, tmp_path, monkeypatch):
    from monai_fl_ext.flare.job import FederatedJobSpec, run_simulation
    from monai_fl_ext.governance.registry import ModelRegistry, tensor_sha256

    dataset_dir, _, partition_dir = tiny_cohort
    overrides = {"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16, "norm": "group"}
    pretrained = _pretrained_stand_in(tmp_path / "pretrained.pt", overrides)
    spec = FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "fl"), num_rounds=1, cross_site_eval=False, wait_time_after_min_received=60,
                            overrides=overrides, privacy={"noise_multiplier": 1.0, "delta": 1e-3},
                            initial_checkpoint=str(tmp_path / "pretrained.pt"))
    monkeypatch.syspath_prepend(str(tmp_path))  # as when the caller's script sits above the output folder
    server = run_simulation(spec, progress=False)
    registry = ModelRegistry(server / "governance")
    assert registry.get("initial")["weights_sha256"] == tensor_sha256(pretrained)
    assert registry.get("round-0")["weights_sha256"] != tensor_sha256(pretrained)  # and DP-SGD then moved it
    trail = [json.loads(line) for line in (server / "governance" / "audit_trail.jsonl").read_text().splitlines()]
    start = next(r for r in trail if r.get("event") == "job_start")
    assert json.dumps(start).count(tensor_sha256(pretrained)) == 1
