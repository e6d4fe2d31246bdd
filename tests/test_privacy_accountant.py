"""Privacy accounting: known values, agreement with Google's dp_accounting, persistence, budgets."""

from __future__ import annotations

import itertools
import json

import pytest

from monai_fl_ext.errors import InputError
from monai_fl_ext.privacy import (
    BudgetExceeded,
    DPSettings,
    PersistentAccountant,
    client_level_epsilon,
    dp_accounting_rdp_epsilon,
    noise_for_target,
    opacus_rdp_epsilon,
)

DELTA = 1e-5


def test_known_opacus_rdp_value():
    # reference.md: q=0.04, sigma=1.5, 2250 steps, delta=1e-5 -> 7.32911117143 (Opacus RDP)
    assert opacus_rdp_epsilon(1.5, 0.04, 2250, DELTA) == pytest.approx(7.32911117143, abs=1e-3)
    assert opacus_rdp_epsilon(4.0, 0.01, 10000, DELTA) == pytest.approx(1.0355, abs=1e-3)
    assert opacus_rdp_epsilon(1.5, 0.04, 0, DELTA) == 0.0


@pytest.mark.parametrize(
    "q,sigma,steps",
    [(0.04, 1.5, 2250), (0.01, 4.0, 10000), (0.02, 1.0, 500), (0.005, 2.0, 20000)],
)
def test_project_epsilon_matches_dp_accounting(tmp_path, q, sigma, steps):
    pytest.importorskip("dp_accounting")
    acc = PersistentAccountant(tmp_path / "acc.json")
    acc.record(sigma, q, steps)
    ours = acc.epsilon(DELTA)
    google = dp_accounting_rdp_epsilon(sigma, q, steps, DELTA)
    assert ours == pytest.approx(opacus_rdp_epsilon(sigma, q, steps, DELTA), abs=1e-12)
    assert abs(ours - google) < 1e-3, (ours, google)


def test_persistence_across_instances(tmp_path):
    path = tmp_path / "site-1" / "privacy.json"
    a = PersistentAccountant(path)
    assert a.epsilon(DELTA) == 0.0 and a.steps == 0 and not path.exists()
    a.record(1.5, 0.04, 1000)
    a.record(2.0, 0.04, 250)
    assert path.exists()
    b = PersistentAccountant(path)
    assert b.steps == a.steps == 1250
    assert b.history == a.history == [(1.5, 0.04, 1000), (2.0, 0.04, 250)]
    assert b.epsilon(DELTA) == pytest.approx(a.epsilon(DELTA), rel=1e-12)
    data = json.loads(path.read_text())
    assert data["history"] == [[1.5, 0.04, 1000], [2.0, 0.04, 250]] and data["steps"] == 1250
    state = b.state()
    assert state["steps"] == 1250 and state["delta"] == DELTA
    assert state["epsilon"] == pytest.approx(a.epsilon(DELTA))


def test_two_rounds_equal_one_shot_and_merge(tmp_path):
    a = PersistentAccountant(tmp_path / "a.json")
    a.record(1.5, 0.04, 1000)
    a.record(1.5, 0.04, 1250)
    assert a.history == [(1.5, 0.04, 2250)]  # merged, as Opacus does per step
    b = PersistentAccountant(tmp_path / "b.json")
    b.record(1.5, 0.04, 2250)
    assert a.epsilon(DELTA) == pytest.approx(b.epsilon(DELTA), rel=1e-12)
    assert a.epsilon(DELTA) == pytest.approx(7.32911117143, abs=1e-3)


def test_epsilon_grows_with_steps(tmp_path):
    acc = PersistentAccountant(tmp_path / "acc.json")
    eps = [acc.epsilon(DELTA)]
    for _ in range(6):
        acc.record(1.2, 0.02, 200)
        eps.append(acc.epsilon(DELTA))
    assert eps[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(eps)), eps


def test_epsilon_after_does_not_mutate(tmp_path):
    path = tmp_path / "acc.json"
    acc = PersistentAccountant(path)
    acc.record(1.5, 0.04, 1000)
    before, text = acc.epsilon(DELTA), path.read_text()
    projected = acc.epsilon_after(1.5, 0.04, 1250, DELTA)
    assert projected == pytest.approx(opacus_rdp_epsilon(1.5, 0.04, 2250, DELTA), rel=1e-12)
    assert projected > before
    assert acc.steps == 1000 and acc.history == [(1.5, 0.04, 1000)]
    assert acc.epsilon(DELTA) == before and path.read_text() == text
    assert acc.epsilon_after(1.5, 0.04, 0, DELTA) == before


def test_budget_exceeded_names_site_and_records_nothing(tmp_path):
    path = tmp_path / "acc.json"
    acc = PersistentAccountant(path)
    acc.record(1.5, 0.04, 1000)
    current = acc.epsilon(DELTA)
    # within budget: returns the projection, records nothing
    ok = acc.check_budget(8.0, DELTA, 1.5, 0.04, 1250, where="site-2")
    assert ok == pytest.approx(7.3291, abs=1e-3) and acc.steps == 1000
    with pytest.raises(BudgetExceeded) as ei:
        acc.check_budget(6.0, DELTA, 1.5, 0.04, 1250, where="site-2")
    msg = str(ei.value)
    assert "site-2" in msg and f"{current:.4f}" in msg and "7.329" in msg and "budget epsilon=6" in msg
    assert isinstance(ei.value, InputError)
    assert ei.value.where == "site-2" and ei.value.budget == 6.0 and ei.value.projected > 6.0
    assert acc.steps == 1000 and PersistentAccountant(path).steps == 1000


@pytest.mark.parametrize("content", ["{not json", json.dumps([1, 2]), json.dumps({"history": [[1.5, 2.0, 10]]}),
                                     json.dumps({"history": [[1.5, 0.04, 10]], "steps": 99})])
def test_corrupt_state_file_raises_naming_file(tmp_path, content):
    path = tmp_path / "site-3-privacy.json"
    path.write_text(content)
    with pytest.raises(InputError, match="site-3-privacy.json"):
        PersistentAccountant(path)


def test_noise_for_target():
    target, q, steps = 8.0, 0.04, 2250
    sigma = noise_for_target(target, DELTA, q, steps)
    eps = opacus_rdp_epsilon(sigma, q, steps, DELTA)
    assert eps <= target and target - eps < 0.05, (sigma, eps)
    with pytest.raises(InputError, match="unreachable"):
        noise_for_target(1e-9, DELTA, 1.0, 10**6)
    with pytest.raises(InputError, match="target_epsilon"):
        noise_for_target(0.0, DELTA, q, steps)


def test_dp_settings_defaults_and_validate():
    s = DPSettings()
    assert s.target_epsilon == 8.0 and s.budget_epsilon == 8.0 and s.delta == 1e-5 and s.max_grad_norm == 1.0
    assert s.accountant == "rdp"
    assert s.validate(1000, "site-1") is s
    s2 = DPSettings(noise_multiplier=1.1)
    assert s2.target_epsilon is None and s2.budget_epsilon is None
    s2.validate(50)
    assert DPSettings.from_dict({"target_epsilon": 4.0}).budget_epsilon == 4.0
    with pytest.raises(InputError, match="unknown"):
        DPSettings.from_dict({"epsilon": 4.0})


def test_dp_settings_rejects_delta_too_large():
    with pytest.raises(InputError) as ei:
        DPSettings(delta=1e-3).validate(2000, "site-2")
    msg = str(ei.value)
    assert "delta=0.001" in msg and "N=2000" in msg and "site-2" in msg and "1/N" in msg
    with pytest.raises(InputError, match="delta"):
        DPSettings(delta=0.0).validate(10, "site-2")


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"target_epsilon": 0.0}, "target_epsilon"),
        ({"target_epsilon": -1.0}, "target_epsilon"),
        ({"target_epsilon": 8.0, "budget_epsilon": -2.0}, "budget_epsilon"),
        ({"target_epsilon": 8.0, "budget_epsilon": 4.0}, "budget_epsilon"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"grad_sample_mode": "ghost"}, "grad_sample_mode"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_dp_settings_rejects_bad_values(kwargs, param):
    with pytest.raises(InputError, match=param) as ei:
        DPSettings(**kwargs).validate(1000, "site-1")
    assert "site-1" in str(ei.value)


def test_dp_settings_rejects_missing_noise_and_target_and_bad_n():
    s = DPSettings(noise_multiplier=1.0)
    s.noise_multiplier = None
    with pytest.raises(InputError, match="noise_multiplier or target_epsilon"):
        s.validate(100, "site-1")
    with pytest.raises(InputError, match="num_samples"):
        DPSettings().validate(0, "site-1")


def test_client_level_epsilon_is_large_and_increasing():
    e20, e50 = client_level_epsilon(1.0, 20, DELTA), client_level_epsilon(1.0, 50, DELTA)
    # reference.md: about 30 after 20 rounds and 57 after 50 (q=1, z=1, delta=1e-5)
    assert 25 < e20 < 35 and 50 < e50 < 65 and e50 > e20
    assert e20 == pytest.approx(30.13, abs=0.05) and e50 == pytest.approx(57.30, abs=0.05)
    assert client_level_epsilon(2.0, 50, DELTA) < e50
    assert client_level_epsilon(5.0, 50, DELTA) < client_level_epsilon(2.0, 50, DELTA)
    assert client_level_epsilon(1.0, 0, DELTA) == 0.0
    assert client_level_epsilon(1.0, 20, DELTA, sampling_rate=0.5) < e20
