"""Client algo and algorithm pieces without FLARE: MONAI's ClientAlgo contract, FedProx, SCAFFOLD, FedOpt, drift."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import BUNDLE


def _site_overrides(tiny_cohort, tiny_overrides, tmp_path, site="site-1"):
    _, _, partition_dir = tiny_cohort
    return {**tiny_overrides, "datalist": str(partition_dir / f"{site}.json"),
            "ckpt_dir": str(tmp_path / "models"), "output_dir": str(tmp_path / "eval")}


def _global_weights(algo):
    return {k: v.detach().clone() for k, v in algo.trainer.network.state_dict().items()}


def test_stock_monai_algo_trains_the_bundle_with_monai_keys(tiny_cohort, tiny_overrides, tmp_path):
    from monai.fl.client import MonaiAlgo
    from monai.fl.utils.constants import ExtraItems, FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    overrides = _site_overrides(tiny_cohort, tiny_overrides, tmp_path)
    algo = MonaiAlgo(str(BUNDLE), local_epochs=1, train_kwargs=overrides, eval_kwargs=overrides)
    algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-7", ExtraItems.APP_ROOT: ""})
    assert algo.client_name == "site-7"  # the real key is "fl_client_name"; "CLIENT_NAME" would be ignored
    weights = _global_weights(algo)
    algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
    update = algo.get_weights()
    assert update.weight_type == WeightType.WEIGHT_DIFF
    assert update.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS] > 0
    assert any(float(v.abs().sum()) > 0 for v in update.weights.values())
    metrics = algo.evaluate(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS)).metrics
    assert "val_auc" in metrics
    algo.finalize()


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold"])
def test_local_terms_change_training_and_report_meta(algorithm, tiny_cohort, tiny_overrides, tmp_path):
    from monai.fl.utils.constants import ExtraItems, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    from monai_fl_ext.algo import FederatedBundleAlgo
    from monai_fl_ext.algorithms import SCAFFOLD_CTRL_DIFF, make_local_term

    algo = FederatedBundleAlgo(BUNDLE, _site_overrides(tiny_cohort, tiny_overrides, tmp_path), local_term=make_local_term(algorithm, 0.5))
    algo.initialize(extra={ExtraItems.CLIENT_NAME: "site-1", ExtraItems.APP_ROOT: ""})
    weights = _global_weights(algo)
    algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS), extra={"meta": {}})
    if algorithm == "fedprox":
        loss = algo.local_term.loss
        prox = loss.prox(algo.trainer.network, loss.global_network)
        assert float(prox) > 0  # the local model moved away from the global one and pays for it
    else:
        c_diff = algo.round_meta[SCAFFOLD_CTRL_DIFF]
        trainable = {k for k, p in algo.trainer.network.named_parameters() if p.requires_grad}
        assert set(c_diff) == trainable
        assert any(np.abs(v).sum() > 0 for v in c_diff.values())
    algo.finalize()


def test_make_local_term_rejects_unknown_algorithm():
    from monai_fl_ext.algorithms import make_local_term

    with pytest.raises(ValueError, match="fedsgd"):
        make_local_term("fedsgd")


def test_server_optimizer_sgd_without_momentum_is_fedavg_and_momentum_accumulates():
    from monai_fl_ext.algorithms import ServerOptimizer

    params = {"w": np.ones(3, dtype=np.float32), "steps": np.array(5, dtype=np.int64)}
    update = {"w": np.full(3, 0.5, dtype=np.float32), "steps": np.array(2, dtype=np.int64)}
    plain = ServerOptimizer("sgd", lr=1.0, momentum=0.0).step(params, update)
    np.testing.assert_allclose(plain["w"], 1.5)
    assert plain["steps"] == 7  # integer buffers are averaged, not optimised
    opt = ServerOptimizer("sgd", lr=1.0, momentum=0.9)
    first = opt.step(params, update)
    second = opt.step(first, update)
    np.testing.assert_allclose(second["w"] - first["w"], 0.5 * 1.9, rtol=1e-6)
    with pytest.raises(ValueError, match="adagrad"):
        ServerOptimizer("adagrad")


def test_drift_diagnostics_norms_and_cosines():
    from monai_fl_ext.diagnostics import drift_diagnostics

    d = drift_diagnostics({"b": {"x": np.array([0.0, 2.0])}, "a": {"x": np.array([3.0, 0.0]), "n": np.array(4)},
                           "c": {"x": np.array([0.0, -1.0])}})
    assert d["sites"] == ["a", "b", "c"]
    assert d["update_norm"] == {"a": 3.0, "b": 2.0, "c": 1.0}  # integer entries are not part of the update vector
    np.testing.assert_allclose(d["cosine"], [[1, 0, 0], [0, 1, -1], [0, -1, 1]])


def test_dp_fedavg_clips_each_site_and_adds_calibrated_noise():
    from monai_fl_ext.algorithms import clip_update, dp_fedavg_mean

    big = {"w": np.full(100, 3.0), "count": np.array(7)}
    clipped, norm = clip_update(big, clip=1.5)
    assert norm == pytest.approx(30.0) and np.linalg.norm(clipped["w"]) == pytest.approx(1.5)
    assert clipped["count"] == 7  # integer buffers are not scaled
    updates = [{"w": np.full(100_000, 10.0)}, {"w": np.full(100_000, -10.0)}]
    noiseless = dp_fedavg_mean(updates, clip=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(noiseless["w"], 0.0, atol=1e-12)  # symmetric clipped updates cancel
    noisy = dp_fedavg_mean(updates, clip=1.0, noise_multiplier=2.0, rng=np.random.default_rng(0))
    assert np.std(noisy["w"]) == pytest.approx(2.0 * 1.0 / 2, rel=0.02)  # sigma = z * C / n
    with pytest.raises(ValueError, match="clip"):
        dp_fedavg_mean(updates, clip=0.0, noise_multiplier=1.0, rng=np.random.default_rng(0))
