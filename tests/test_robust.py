"""Update validation, robust aggregators, outlier flags, fault plans and site checks (no FLARE)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from monai_fl_ext.errors import InputError
from monai_fl_ext.faults import FaultPlan, decide, poison_update
from monai_fl_ext.robust import aggregate, flag_outliers, relative_norm_bounds, update_norm, validate_update
from monai_fl_ext.site_checks import check_site_data, compare_versions, software_versions

REF = {"conv.weight": np.zeros((2, 3), dtype=np.float32), "fc.bias": np.zeros(4, dtype=np.float32)}


def _update(scale: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(0, 0.01, v.shape) * scale).astype(np.float32) for k, v in REF.items()}


@pytest.mark.parametrize("kind,match", [
    ("nan", "conv.weight has 1 non-finite value"),
    ("shape", r"shape of conv.weight is \(5,\), the global model's is \(2, 3\)"),
    ("keys", r"unexpected \['injected.weight'\]"),
])
def test_poisoned_updates_are_rejected_with_the_reason(kind, match):
    import torch

    poisoned = {k: v.numpy() for k, v in poison_update({k: torch.as_tensor(v) for k, v in _update().items()}, kind).items()}
    assert validate_update(_update(), REF) is None
    assert re.search(match, validate_update(poisoned, REF) or "")


def test_norm_bounds_absolute_and_relative_to_the_other_sites():
    big = _update(scale=1e4)
    assert "exceeds the bound 1" in validate_update(big, REF, max_norm=1.0)
    norms = {"site-1": update_norm(_update(seed=1)), "site-2": update_norm(_update(seed=2)), "site-3": update_norm(big)}
    bounds = relative_norm_bounds(norms, factor=10.0)
    assert norms["site-3"] > bounds["site-3"]  # the scaled site is judged by the others' median
    assert norms["site-1"] <= bounds["site-1"] and norms["site-2"] <= bounds["site-2"]
    two = relative_norm_bounds({"a": 1.0, "b": 1e6}, 10.0)  # two sites: each is compared with the other
    assert two["a"] == 1e7 and two["b"] == 10.0


def test_robust_aggregators_resist_one_outlier_and_the_mean_does_not():
    honest = [_update(seed=s) for s in range(4)]
    attacker = {k: np.full_like(v, 50.0) for k, v in REF.items()}
    updates = {f"site-{i}": u for i, u in enumerate([*honest, attacker])}
    weights = {s: 1.0 for s in updates}
    honest_mean = {k: np.mean([u[k] for u in honest], axis=0) for k in REF}
    mean = aggregate(updates, weights, "mean")
    assert np.abs(mean["conv.weight"] - honest_mean["conv.weight"]).max() > 5
    for method in ("median", "trimmed_mean", "norm_clip"):
        out = aggregate(updates, weights, method, trim_fraction=0.2)
        assert np.abs(out["conv.weight"] - honest_mean["conv.weight"]).max() < 0.1, method
        assert out["conv.weight"].dtype == np.float32
    exact = aggregate({"a": {"w": np.array([1.0])}, "b": {"w": np.array([4.0])}}, {"a": 3.0, "b": 1.0}, "mean")
    assert exact["w"][0] == pytest.approx(1.75)
    with pytest.raises(ValueError, match="aggregator must be one of"):
        aggregate(updates, weights, "krum")


def test_outlier_flags_name_the_site_and_the_reason():
    norms = {"site-1": 1.0, "site-2": 1.1, "site-3": 0.95, "site-4": 30.0}
    sites = sorted(norms)
    cosine = [[1, 0.5, 0.4, -0.6], [0.5, 1, 0.45, -0.5], [0.4, 0.45, 1, -0.7], [-0.6, -0.5, -0.7, 1]]
    flags = flag_outliers(norms, cosine, sites)
    assert set(flags) == {"site-4"}
    assert any("robust SDs" in r for r in flags["site-4"]) and any("mean cosine" in r for r in flags["site-4"])
    assert flag_outliers({"a": 1.0, "b": 100.0}) == {}  # too few sites to judge


def test_fault_plan_draws_replay_and_follow_the_rates():
    plan = FaultPlan.from_dict({"seed": 7, "sites": {"*": {"delay": [0, 2], "dropout": 0.3},
                                                     "site-2": {"fail_rounds": [1], "unreachable": [[3, 4]], "silence": 9,
                                                                "poison": {"2": "nan"}}}})
    one = plan.site_json("site-1")
    draws = [decide(one, r) for r in range(400)]
    assert draws == [decide(one, r) for r in range(400)]  # deterministic
    assert 0.22 < np.mean([d.fail for d in draws]) < 0.38
    assert all(0 <= d.delay <= 2 for d in draws) and len({d.delay for d in draws}) > 100
    two = plan.site_json("site-2")
    assert decide(two, 1).fail and decide(two, 2).poison == "nan" and decide(two, 3).silent == 9 and decide(two, 5).silent == 0
    for bad, match in [({"sites": {"s": {"dropout": 2}}}, "dropout must be a probability"),
                       ({"sites": {"s": {"unreachable": [[1, 2]]}}}, "need silence > 0"),
                       ({"sites": {"s": {"poison": {"1": "flip"}}}}, "poison kinds"),
                       ({"sites": {"s": {"jitter": 1}}}, "unexpected keyword"),
                       ({"plan": 1}, "unknown keys")]:
        with pytest.raises(InputError, match=match):
            FaultPlan.from_dict(bad)


def _datalist(tmp_path, items):
    (tmp_path / "img").mkdir(exist_ok=True)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    path = tmp_path / "site.json"
    path.write_text(json.dumps({"labels": ["a", "b"], "training": items, "validation": []}))
    return path


def test_bad_site_data_fails_naming_site_file_and_item_or_is_skipped_by_policy(tmp_path):
    items = [{"image": "img/ok.png", "label": [0, 1]}, {"image": "img/missing.png", "label": [1, 0]},
             {"image": "img/ok.png", "label": [0, 2]}, {"image": "img/corrupt.png", "label": [1, 1]}]
    path = _datalist(tmp_path, items)
    with pytest.raises(InputError, match=r"site-2: site.json training\[1\]: img/missing.png: file not found \(and 1 more\)"):
        check_site_data(path, tmp_path, "site-2")
    with pytest.raises(InputError, match=r"site-2: site.json training\[1\]: img/corrupt.png: does not decode"):
        check_site_data(_datalist(tmp_path, [items[0], items[3]]), tmp_path, "site-2", decode=True)
    clean, problems = check_site_data(_datalist(tmp_path, items), tmp_path, "site-2", policy="skip", decode=True)
    assert len(problems) == 3 and json.loads(clean.read_text())["training"] == [items[0]]
    with pytest.raises(InputError, match=r"site-2: no usable training items in .*site.json \(empty partition\)"):
        check_site_data(_datalist(tmp_path, []), tmp_path, "site-2")


def test_version_comparison_names_both_versions_and_accepts_cpu_and_cuda_builds():
    from monai_fl_ext.bundle import resolve_bundle

    mine = software_versions(resolve_bundle("chest_xray_classification"))
    assert set(mine) >= {"bundle_version", "bundle_config_sha256", "monai", "torch", "opacus", "nvflare"}
    assert compare_versions(mine, dict(mine)) == []
    assert compare_versions({"torch": "2.13.0+cpu"}, {"torch": "2.13.0+cu126"}) == []
    diffs = compare_versions(mine, {**mine, "monai": "1.5.0", "bundle_version": "0.0.1"})
    assert f"monai: site 1.5.0, job {mine['monai']}" in diffs and any(d.startswith("bundle_version: site 0.0.1") for d in diffs)
    assert compare_versions({"opacus": "1.6.0"}, {}) == ["opacus: the site did not report it (job: 1.6.0)"]


def test_stress_judgement_needs_the_whole_confidence_interval_on_the_right_side_of_the_tolerance():
    from monai_fl_ext.stress import judge_difference

    better = judge_difference([0.083, 0.066, 0.056])  # faulty runs better in every seed
    assert better["mean"] == pytest.approx(0.068333, abs=1e-6)
    half = 4.302653 * better["sd"] / 3 ** 0.5  # t quantile 0.975 with 2 degrees of freedom
    assert better["ci"] == pytest.approx([better["mean"] - half, better["mean"] + half], abs=1e-6)
    assert (better["no_worse"], better["equivalent"]) == ("met", "not met")
    assert judge_difference([-0.05, -0.06, -0.055])["no_worse"] == "not met"
    close = judge_difference([0.004, -0.003, 0.001, 0.0])
    assert (close["no_worse"], close["equivalent"]) == ("met", "met")
    noisy = judge_difference([-0.0124, -0.1182, 0.0731])  # a mean inside the tolerance is not enough
    assert abs(noisy["mean"]) < 0.02 and (noisy["no_worse"], noisy["equivalent"]) == ("undetermined", "undetermined")
    with pytest.raises(ValueError, match="at least two seeds"):
        judge_difference([0.01])
