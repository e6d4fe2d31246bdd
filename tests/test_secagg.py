"""Secure aggregation protocol (no FLARE): exactness within the proven bound, indistinguishability, dropout recovery, bad input."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from monai_fl_ext.secagg import (
    FixedPoint,
    RoundConfig,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggServer,
    default_threshold,
    flatten,
    unflatten,
)
from monai_fl_ext.secagg import crypto

JOB = "job-7"


def _sites(n: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n)]


def _msg(cfg: RoundConfig, site: str, **extra) -> dict:
    return {"job_id": cfg.job_id, "round": cfg.round, "site": site, **extra}


def _setup(n: int, t: int, length: int, bits: int = 32, round_num: int = 3, job: str = JOB):
    """Run steps 1 and 2 for every site: (config, clients, server)."""
    cfg = RoundConfig(job, round_num, tuple(_sites(n)), t, length, bits=bits)
    clients = {s: SecAggClient(cfg, s) for s in cfg.sites}
    server = SecAggServer(cfg)
    for s, c in clients.items():
        server.add_keys(s, c.advertise())
    directory = server.directory()
    for s, c in clients.items():
        server.add_shares(s, c.share_keys(directory))
    mailbox = server.mailbox()
    for c in clients.values():
        c.receive_shares(mailbox)
    return cfg, clients, server


def _finish(cfg, clients, server, updates, weights, dropped=()):
    """Steps 3 and 4 with ``dropped`` sites vanishing after the share exchange; returns the result."""
    for s, c in clients.items():
        if s not in dropped:
            masked, _ = c.mask(updates[s], weights[s])
            server.add_masked(s, _msg(cfg, s, masked=masked))
    request = server.unmask_request()
    for s in request["survivors"]:
        server.add_unmask(s, clients[s].unmask(**request))
    return server.aggregate()


def _exact_weighted_mean(updates, weights, sites, clip):
    """The weighted mean of the clipped updates in exact rational arithmetic (the reference, free of float error)."""
    total_w = sum(Fraction(weights[s]) for s in sites)
    out = []
    for i in range(len(next(iter(updates.values())))):
        acc = sum(Fraction(weights[s]) * Fraction(float(np.clip(updates[s][i], -clip, clip))) for s in sites)
        out.append(acc / total_w)
    return out


def _data(n: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    updates = {s: rng.normal(0, 0.02, length) for s in _sites(n)}
    weights = {s: float(rng.integers(1, 300)) for s in _sites(n)}
    return updates, weights


@pytest.mark.parametrize("bits", [32, 64])
def test_aggregate_equals_the_exact_weighted_mean_within_the_stated_bound(bits):
    updates, weights = _data(4, 300)
    updates["site-2"][:5] = [9.0, -9.0, 8.5, -100.0, 0.5]  # some coordinates beyond the clip range
    cfg, clients, server = _setup(4, 3, 300, bits=bits)
    result = _finish(cfg, clients, server, updates, weights)
    exact = _exact_weighted_mean(updates, weights, cfg.sites, cfg.clip_range)
    err = max(abs(Fraction(float(m)) - e) for m, e in zip(result.mean, exact))
    assert err <= Fraction(result.error_bound)
    assert result.error_bound < (1e-4 if bits == 32 else 1e-12)
    assert result.total_weight == pytest.approx(sum(weights.values()), rel=1e-6)
    assert result.contributors == list(cfg.sites) and result.dropped == []


def test_the_bound_is_not_loose():
    """The bound must track the real error (within a factor of 10), or it would prove nothing."""
    updates, weights = _data(3, 2000, seed=5)
    cfg, clients, server = _setup(3, 2, 2000)
    result = _finish(cfg, clients, server, updates, weights)
    exact = np.array([float(x) for x in _exact_weighted_mean(updates, weights, cfg.sites, cfg.clip_range)])
    assert np.max(np.abs(result.mean - exact)) > result.error_bound / 10


def test_dropping_any_n_minus_t_sites_after_setup_gives_the_exact_survivor_aggregate():
    n, t, length = 5, 3, 64
    updates, weights = _data(n, length, seed=1)
    for k in range(n - t + 1):
        for dropped in itertools.combinations(_sites(n), k):
            cfg, clients, server = _setup(n, t, length)
            result = _finish(cfg, clients, server, updates, weights, dropped=dropped)
            survivors = [s for s in cfg.sites if s not in dropped]
            assert result.contributors == survivors and result.dropped == list(dropped)
            exact = _exact_weighted_mean(updates, weights, survivors, cfg.clip_range)
            err = max(abs(Fraction(float(m)) - e) for m, e in zip(result.mean, exact))
            assert err <= Fraction(result.error_bound), dropped


def test_fewer_survivors_than_the_threshold_aborts_the_round():
    updates, weights = _data(5, 16)
    cfg, clients, server = _setup(5, 3, 16)
    for s in ("site-1", "site-2"):
        masked, _ = clients[s].mask(updates[s], weights[s])
        server.add_masked(s, _msg(cfg, s, masked=masked))
    with pytest.raises(SecAggAbort, match="below the threshold 3"):
        server.unmask_request()
    with pytest.raises(SecAggAbort):
        server.aggregate()


def test_survivors_that_do_not_answer_the_unmask_step_abort_below_threshold():
    updates, weights = _data(4, 16)
    cfg, clients, server = _setup(4, 3, 16)
    for s, c in clients.items():
        server.add_masked(s, _msg(cfg, s, masked=c.mask(updates[s], weights[s])[0]))
    request = server.unmask_request()
    for s in ("site-1", "site-2"):
        server.add_unmask(s, clients[s].unmask(**request))
    with pytest.raises(SecAggAbort, match="unmasking"):
        server.aggregate()


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_what_the_server_receives_from_one_site_is_indistinguishable_from_uniform_noise():
    from scipy import stats

    length = 20_000
    rng = np.random.default_rng(2)
    structured = np.sin(np.linspace(0, 40, length)) * 0.5 + rng.normal(0, 0.01, length)  # a strongly patterned update
    updates = {"site-1": structured, "site-2": np.zeros(length), "site-3": -structured}
    weights = {s: 10.0 for s in updates}
    cfg, clients, server = _setup(3, 2, length)
    captured = {}
    for s, c in clients.items():
        masked, _ = c.mask(updates[s], weights[s])
        captured[s] = masked.copy()  # exactly what crosses the wire to the server
        server.add_masked(s, _msg(cfg, s, masked=masked))
    encoded, _ = cfg.encoding.encode(structured, 10.0)
    plain_signed = encoded.view(np.int32)[1:]
    assert abs(_correlation(plain_signed, structured)) > 0.99  # the encoding alone would leak everything
    bound = 5 / np.sqrt(length)
    for s, masked in captured.items():
        values = masked[1:]
        assert abs(_correlation(values, structured)) < bound, s
        assert abs(_correlation(values.view(np.int32), structured)) < bound, s
        # uniform over the ring: Kolmogorov-Smirnov against U(0, 2^32) and a flat byte histogram
        assert stats.kstest(values / 2.0**32, "uniform").pvalue > 1e-4, s
        counts = np.bincount(values.view(np.uint8), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4, s
    # the zero update looks exactly like the patterned one: two-sample test cannot tell them apart
    assert stats.ks_2samp(captured["site-1"][1:], captured["site-2"][1:]).pvalue > 1e-4
    request = server.unmask_request()
    for s in request["survivors"]:
        server.add_unmask(s, clients[s].unmask(**request))
    result = server.aggregate()
    assert np.max(np.abs(result.mean)) <= result.error_bound  # the three updates sum to zero


def test_a_site_declared_dropped_that_arrives_late_is_refused_and_cannot_be_unmasked_alone():
    length = 5_000
    updates, weights = _data(4, length, seed=3)
    updates["site-4"] = np.linspace(-1, 1, length)
    cfg, clients, server = _setup(4, 3, length)
    late_vector, _ = clients["site-4"].mask(updates["site-4"], weights["site-4"])
    result = _finish(cfg, {s: c for s, c in clients.items() if s != "site-4"}, server, updates, weights)
    assert result.dropped == ["site-4"]
    with pytest.raises(SecAggError, match="site-4, round 3: masked update arrived after unmasking began"):
        server.add_masked("site-4", _msg(cfg, "site-4", masked=late_vector))
    # a curious server now holds site-4's mask key (reconstructed to remove its pairwise masks) and its late
    # vector; removing every pairwise mask still leaves the self-mask, whose seed was never revealed
    raw = server._reconstruct("site-4", "s", lambda s: crypto.public_of(s) == server.keys["site-4"]["s_pk"])
    private = crypto.private_from_bytes(raw)
    residual = late_vector.copy()
    from monai_fl_ext.secagg.protocol import _pair_seed

    for v in ("site-1", "site-2", "site-3"):
        mask = crypto.expand_mask(_pair_seed(cfg, private, server.keys[v]["s_pk"], "site-4", v), length + 1, np.uint32)
        residual += mask  # site-4 sorts after every peer, so it subtracted each pairwise mask
    assert abs(_correlation(residual[1:].view(np.int32), updates["site-4"])) < 5 / np.sqrt(length)
    # survivors never reveal shares of site-4's self-mask seed: they refuse a second, different split
    with pytest.raises(SecAggError, match="already answered"):
        clients["site-1"].unmask(survivors=list(cfg.sites), dropped=[])


def test_masks_come_from_the_chacha20_keystream_and_keys_are_bound_to_job_round_and_pair():
    # RFC 8439 section 2.4.2 / 2.3.2 zero-key block: the keystream begins 76 b8 e0 ad a0 f1 3d 90
    zero = crypto.expand_mask(bytes(32), 4, np.uint32)
    assert zero.tobytes()[:8] == bytes.fromhex("76b8e0ada0f13d90")
    a, a_pub = crypto.new_keypair()
    b, b_pub = crypto.new_keypair()
    info = crypto.context(JOB, 3, "pair-mask", "site-1", "site-2")
    assert crypto.agree(a, b_pub, info) == crypto.agree(b, a_pub, info)
    others = [crypto.context("job-8", 3, "pair-mask", "site-1", "site-2"), crypto.context(JOB, 4, "pair-mask", "site-1", "site-2"),
              crypto.context(JOB, 3, "share-key", "site-1", "site-2"), crypto.context(JOB, 3, "pair-mask", "site-1", "site-3")]
    keys = {crypto.agree(a, b_pub, i) for i in [info, *others]}
    assert len(keys) == 5


def test_shamir_shares_reconstruct_from_any_threshold_subset_only():
    secret = bytes(range(32))
    shares = crypto.split_secret(secret, 3, 5)
    for subset in itertools.combinations(shares, 3):
        assert crypto.combine_secret(list(subset)) == secret
    assert crypto.combine_secret(shares[:2]) != secret


def test_a_site_refuses_an_unmask_request_that_would_reveal_both_secrets_of_a_site():
    updates, weights = _data(4, 8)
    cfg, clients, server = _setup(4, 2, 8)
    clients["site-1"].unmask(survivors=["site-1", "site-2", "site-3"], dropped=["site-4"])
    with pytest.raises(SecAggError, match="already answered"):
        clients["site-1"].unmask(survivors=["site-1", "site-2", "site-3", "site-4"], dropped=[])
    with pytest.raises(SecAggError, match="must split the share senders"):
        clients["site-2"].unmask(survivors=["site-1", "site-2"], dropped=["site-3"])


@pytest.mark.parametrize("case,match", [
    ("length", r"site-2, round 3: the masked update must be uint32 of shape \(17,\)"),
    ("dtype", r"site-2, round 3: the masked update must be uint32"),
    ("replay", r"site-2, round 3: masked update message is for job 'job-7', round 2"),
    ("stranger", r"site-9, round 3: masked update from a site that is not in the round's key directory"),
    ("twice", r"site-2, round 3: masked update sent twice"),
])
def test_bad_masked_updates_are_rejected_naming_site_and_round_and_the_round_completes_without_them(case, match):
    updates, weights = _data(4, 16)
    cfg, clients, server = _setup(4, 3, 16)
    good = {s: clients[s].mask(updates[s], weights[s])[0] for s in cfg.sites}
    bad_site, msg = "site-2", _msg(cfg, "site-2", masked=good["site-2"])
    if case == "length":
        msg["masked"] = good["site-2"][:-1]
    elif case == "dtype":
        msg["masked"] = good["site-2"].astype(np.int64)
    elif case == "replay":
        msg["round"] = 2
    elif case == "stranger":
        bad_site, msg = "site-9", _msg(cfg, "site-9", masked=good["site-2"])
    elif case == "twice":
        server.add_masked("site-2", _msg(cfg, "site-2", masked=good["site-2"]))
    before = dict(server.masked)
    with pytest.raises(SecAggError, match=match):
        server.add_masked(bad_site, msg)
    assert server.masked == before and server.rejected  # nothing half-applied, the reason is kept
    for s in cfg.sites:
        if s not in server.masked and not (case != "twice" and s == "site-2"):
            server.add_masked(s, _msg(cfg, s, masked=good[s]))
    request = server.unmask_request()
    for s in request["survivors"]:
        server.add_unmask(s, clients[s].unmask(**request))
    result = server.aggregate()
    exact = _exact_weighted_mean(updates, weights, result.contributors, cfg.clip_range)
    assert max(abs(Fraction(float(m)) - e) for m, e in zip(result.mean, exact)) <= Fraction(result.error_bound)
    assert ("site-2" in result.contributors) == (case == "twice")


def test_a_share_that_fails_to_reconstruct_aborts_naming_the_site_and_a_tampered_share_does_not_decrypt():
    updates, weights = _data(3, 8)
    cfg, clients, server = _setup(3, 3, 8)
    for s, c in clients.items():
        server.add_masked(s, _msg(cfg, s, masked=c.mask(updates[s], weights[s])[0]))
    request = server.unmask_request()
    for s in cfg.sites:
        answer = clients[s].unmask(**request)
        if s == "site-3":
            idx, share = answer["b_shares"]["site-1"]
            answer["b_shares"]["site-1"] = [idx, bytes(32)]
        server.add_unmask(s, answer)
    with pytest.raises(SecAggAbort, match="shares of site-1's self-mask seed .* do not reconstruct"):
        server.aggregate()
    # in transit, an altered sealed share is detected by the AEAD tag and recorded, not used
    cfg2, clients2, server2 = RoundConfig(JOB, 4, tuple(_sites(3)), 2, 8), None, None
    clients2 = {s: SecAggClient(cfg2, s) for s in cfg2.sites}
    server2 = SecAggServer(cfg2)
    for s, c in clients2.items():
        server2.add_keys(s, c.advertise())
    for s, c in clients2.items():
        server2.add_shares(s, c.share_keys(server2.directory()))
    mailbox = server2.mailbox()
    mailbox["site-1"]["site-2"] = mailbox["site-1"]["site-2"][:-1] + bytes([mailbox["site-1"]["site-2"][-1] ^ 1])
    clients2["site-2"].receive_shares(mailbox)
    assert clients2["site-2"].problems == ["site-2, round 4: the share from site-1 is missing or does not decrypt"]


def test_key_directory_and_config_validation():
    with pytest.raises(ValueError, match="at least 2 sites"):
        RoundConfig(JOB, 0, ("site-1",), 2, 4)
    with pytest.raises(ValueError, match="threshold must be between 2 and the 3 sites"):
        RoundConfig(JOB, 0, tuple(_sites(3)), 4, 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        RoundConfig(JOB, 0, tuple(_sites(3)), 2, 4, bits=16)
    assert [default_threshold(n) for n in (2, 3, 4, 10, 30)] == [2, 2, 3, 6, 16]
    cfg = RoundConfig(JOB, 0, tuple(_sites(3)), 2, 4)
    server = SecAggServer(cfg)
    clients = {s: SecAggClient(cfg, s) for s in cfg.sites}
    server.add_keys("site-1", clients["site-1"].advertise())
    with pytest.raises(SecAggError, match="keys advertised twice"):
        server.add_keys("site-1", clients["site-1"].advertise())
    with pytest.raises(SecAggError, match="a public key repeats another's"):
        server.add_keys("site-2", {**clients["site-2"].advertise(), "c_pk": clients["site-1"].c_public})
    with pytest.raises(SecAggAbort, match="below the threshold"):
        server.directory()
    server.add_keys("site-2", clients["site-2"].advertise())
    directory = server.directory()
    with pytest.raises(SecAggError, match="does not hold this site's own public keys"):
        clients["site-3"].share_keys(directory)  # site-3's keys were swapped out or never arrived
    with pytest.raises(SecAggError, match="weight 5000.0 is outside"):
        clients["site-1"].share_keys(directory)
        clients["site-1"].receive_shares({"site-1": {}, "site-2": {"site-1": b""}})
        clients["site-1"].mask(np.zeros(4), 5000.0)


def test_fixed_point_never_overflows_at_the_extremes():
    enc = FixedPoint(num_sites=30, bits=32, clip_range=1.0, max_weight=10.0)
    extreme = np.array([1.0, -1.0, 5.0, -5.0])
    total = sum(enc.encode(extreme, 10.0)[0] for _ in range(30))
    mean, total_w, bound = enc.decode_sum(np.asarray(total, dtype=enc.dtype), 30)
    assert total_w == pytest.approx(30.0, rel=1e-6)
    assert np.allclose(mean, [1.0, -1.0, 1.0, -1.0], atol=bound)
    with pytest.raises(ValueError, match="31 contributors exceed"):
        enc.decode_sum(total, 31)


def test_flatten_and_unflatten_round_trip_in_a_fixed_order():
    params = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.0], dtype=np.float32)}
    keys = sorted(params)
    vec = flatten(params, keys)
    assert vec.tolist() == [7.0, 0, 1, 2, 3, 4, 5]
    back = unflatten(vec, params, keys)
    assert all(np.array_equal(back[k], params[k]) and back[k].dtype == np.float32 for k in keys)
