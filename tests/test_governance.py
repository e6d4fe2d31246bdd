"""Governance: signed audit trail and tamper detection, registry lineage and bundle export, contribution
ledger and the raw-update check, dashboard (headless Chromium when present) and PDF report, CLI exit codes.

The fast tests drive :class:`GovernanceRecorder` from a tiny job whose updates are real SGD steps of the
bundle's network (in the order the FLARE controller makes its calls); the slow test replays the
``history.json`` of a real FLARE simulation with DP-SGD and secure aggregation.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLE, TINY_SIZE

SITES = ("site-1", "site-2", "site-3")


# ---- helpers ---------------------------------------------------------------------------------------
def _network(bundle: Path = BUNDLE, norm: str | None = "group") -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle), **({"norm": norm} if norm else {})})
    return parser.get_parsed_content("network_def")


def _local_step(net: torch.nn.Module, state: dict, seed: int) -> dict[str, torch.Tensor]:
    """One real SGD step of the bundle network on random images: a real site update (weight diff)."""
    torch.manual_seed(seed)
    net.load_state_dict(state)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.rand(4, 1, TINY_SIZE, TINY_SIZE), (torch.rand(4, 14) > 0.8).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: (v.detach() - state[k]).clone() for k, v in net.state_dict().items()}


def _save(params: dict, path: Path) -> None:
    import io

    from monai_fl_ext.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}, buf)  # as the controller saves
    atomic_write_bytes(path, buf.getvalue())


def _flat(update: dict) -> np.ndarray:
    return np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in sorted(update)])


def run_tiny_job(server: Path, rounds: int = 2) -> dict[int, dict[str, dict]]:
    """A 3-site FedAvg job with DP accounting, calling the recorder where the controller will; returns the updates."""
    from monai_fl_ext.governance import GovernanceRecorder, contribution_stats
    from monai_fl_ext.io import atomic_write_json
    from monai_fl_ext.privacy import opacus_rdp_epsilon

    rec = GovernanceRecorder(server / "governance", job_id="tiny-job")
    net = _network()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    config = {"algorithm": "fedavg", "num_rounds": rounds, "weighting": "steps", "min_clients": 2, "key_metric": "val_auc"}
    rec.job_start(config, sites=[*SITES, "site-4"], initial_params=state)
    history: dict = {"config": config, "rounds": [], "status": "running"}
    all_updates, best = {}, -1.0
    for rnd in range(rounds):
        rec.round_start(rnd, [*SITES, "site-4"])
        if rnd == 0:
            for s in SITES:
                rec.site_joined(rnd, s)
        updates = {s: _local_step(net, state, seed=10 * rnd + i) for i, s in enumerate(SITES)}
        all_updates[rnd] = updates
        steps = {s: i + 1 for i, s in enumerate(SITES)}
        mean = {k: sum(steps[s] * updates[s][k] for s in SITES) / sum(steps.values()) for k in state}
        privacy = {s: {"epsilon": opacus_rdp_epsilon(1.0, 0.5, (rnd + 1) * steps[s], 1e-3), "delta": 1e-3, "noise_multiplier": 1.0,
                       "sample_rate": 0.5, "max_grad_norm": 1.0, "steps": (rnd + 1) * steps[s], "budget_epsilon": 50.0} for s in SITES}
        site_metrics = {s: {"val_auc": 0.5 + 0.1 * rnd + 0.01 * i} for i, s in enumerate(SITES)}
        flat = {s: _flat(updates[s]) for s in SITES}
        record = {"round": rnd, "sites": list(SITES), "sites_ok": list(SITES), "sites_failed": {"site-4": "no answer within the round"},
                  "weights": {s: float(w) for s, w in steps.items()}, "steps": steps, "samples": {s: 10 * steps[s] for s in SITES},
                  "site_metrics": site_metrics, "global_metrics": {"val_auc": float(np.mean([m["val_auc"] for m in site_metrics.values()]))},
                  "privacy": privacy, "max_epsilon": max(p["epsilon"] for p in privacy.values()),
                  "update_norm": {s: float(np.linalg.norm(flat[s])) for s in SITES},
                  "cosine": [[float(flat[a] @ flat[b] / np.linalg.norm(flat[a]) / np.linalg.norm(flat[b])) for b in SITES] for a in SITES],
                  "seconds": 1.0}
        for s in SITES:
            rec.update_accepted(rnd, s, {**contribution_stats(updates[s], mean), "samples": record["samples"][s],
                                         "local_steps": steps[s], "privacy": privacy[s]})
        rec.site_dropped(rnd, "site-4", record["sites_failed"]["site-4"])
        model_before = dict(state)
        if rnd > 0 and record["global_metrics"]["val_auc"] > best:  # as the controller: the model the sites evaluated
            best = record["global_metrics"]["val_auc"]
            _save(model_before, server / "models" / "best_global_model.pt")
            rec.model_saved(rnd, "best_global_model.pt", server / "models" / "best_global_model.pt", record["global_metrics"], model_before)
        state = {k: state[k] + mean[k] for k in state}
        record["aggregated"] = True
        rec.aggregated(rnd, record, params=state)
        history["rounds"].append(record)
        atomic_write_json(server / "history.json", history)
    _save(state, server / "models" / "final_global_model.pt")
    rec.model_saved(rounds - 1, "final_global_model.pt", server / "models" / "final_global_model.pt", params=state)
    history["final"] = {"global_metrics": {"val_auc": 0.75}, "site_metrics": {s: {"val_auc": 0.75} for s in SITES}}
    history["status"] = "completed"
    atomic_write_json(server / "history.json", history)
    rec.job_end("completed", history["final"]["global_metrics"])
    return all_updates


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    """(server_dir, updates per round per site) of a finished tiny job with governance outputs."""
    server = tmp_path_factory.mktemp("gov_job") / "server"
    updates = run_tiny_job(server)
    return server, updates


def _trail(tmp_path: Path, n: int = 8):
    from monai_fl_ext.governance import AuditTrail

    trail = AuditTrail(tmp_path / "audit_trail.jsonl", tmp_path / "keys" / "server.pem")
    for i in range(n):
        trail.append("job_start" if i == 0 else "round_start", {"round": i, "sites": ["site-1", "site-2"]})
    return trail


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _pdf_text(data: bytes) -> str:
    """Text of a PDF's (Flate-compressed) content streams, enough to search for words."""
    text = []
    for m in re.finditer(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            text.append(zlib.decompress(m.group(1)).decode("latin-1"))
        except zlib.error:
            continue
    return "".join(text)


# ---- audit trail -----------------------------------------------------------------------------------
def test_intact_trail_verifies_and_is_continued_by_a_new_process(tmp_path):
    from monai_fl_ext.governance import AuditTrail, verify_trail

    trail = _trail(tmp_path)
    verdict = verify_trail(trail.path)
    assert verdict.ok and verdict.records == 8 and verdict.reason == "ok" and not verdict.complete
    again = AuditTrail(trail.path, tmp_path / "keys" / "server.pem")  # restart: same key, chain continues
    again.append("job_end", {"status": "completed"})
    verdict = verify_trail(trail.path, tmp_path / "keys" / "server.pem")
    assert verdict.ok and verdict.records == 9 and verdict.complete
    assert (tmp_path / "keys" / "server.pem").stat().st_mode & 0o077 == 0  # private key readable by the owner only
    assert [json.loads(x)["seq"] for x in _lines(trail.path)] == list(range(9))


@pytest.mark.parametrize("tamper, reason, first_bad", [
    ("edit", "edited", 3),
    ("rehash", "bad_signature", 3),
    ("delete", "deleted", 3),
    ("reorder", "reordered", 3),
    ("insert_copy", "inserted", 5),
    ("insert_forged", "inserted", 3),
    ("truncate_torn", "truncated", 7),
    ("truncate_tail", "truncated", 6),
    ("garbage", "corrupted", 2),
    ("bad_types", "corrupted", 4),
])
def test_tampering_is_detected_and_names_the_first_bad_record(tmp_path, tamper, reason, first_bad):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from monai_fl_ext.governance import verify_trail
    from monai_fl_ext.governance.audit import canonical_json, record_hash

    trail = _trail(tmp_path)
    lines = _lines(trail.path)
    if tamper == "edit":
        rec = json.loads(lines[3])
        rec["fields"]["sites"] = ["site-1"]  # quietly drop a participant
        lines[3] = canonical_json(rec) + b"\n"
    elif tamper == "rehash":  # edit and recompute the hash: only the signature can tell
        rec = json.loads(lines[3])
        rec["fields"]["round"] = 99
        rec["hash"] = record_hash(rec)
        lines[3] = canonical_json(rec) + b"\n"
    elif tamper == "delete":
        del lines[3]
    elif tamper == "reorder":
        lines[3], lines[4] = lines[4], lines[3]
    elif tamper == "insert_copy":
        lines.insert(5, lines[2])
    elif tamper == "insert_forged":  # a well-formed record that chains correctly, signed by an attacker's key
        prev = json.loads(lines[2])
        forged = {"seq": 3, "time": prev["time"], "event": "site_dropped", "fields": {"site": "site-2"}, "key_id": prev["key_id"],
                  "prev_hash": prev["hash"]}
        forged["hash"] = record_hash(forged)
        forged["signature"] = base64.b64encode(Ed25519PrivateKey.generate().sign(forged["hash"].encode())).decode()
        lines.insert(3, canonical_json(forged) + b"\n")
    elif tamper == "truncate_torn":  # a crash in the middle of the last append
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    elif tamper == "truncate_tail":  # whole records cut from the end: the signed head remembers them
        lines = lines[:6]
    elif tamper == "garbage":
        lines[2] = b"\x00\xff not json\n"
    elif tamper == "bad_types":  # valid JSON, wrong shape: must give a verdict, not a TypeError
        rec = json.loads(lines[4])
        rec["seq"] = "4"
        lines[4] = json.dumps(rec).encode() + b"\n"
    trail.path.write_bytes(b"".join(lines))
    verdict = verify_trail(trail.path, tmp_path / "keys" / "server.pem")
    assert not verdict.ok, verdict.message
    assert verdict.reason == reason, verdict.message
    assert verdict.first_bad_seq == first_bad and verdict.first_bad_line == first_bad + 1
    assert str(trail.path) in verdict.detail and (f"record {first_bad}" in verdict.detail or f"seq {first_bad}" in verdict.detail)
    assert verdict.records == first_bad  # everything before the first bad record still verifies


def test_wrong_key_unreadable_and_empty_trails_give_verdicts_not_crashes(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from monai_fl_ext.governance import verify_trail
    from monai_fl_ext.governance.audit import public_pem

    trail = _trail(tmp_path)
    other = tmp_path / "other.pub.pem"
    other.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    verdict = verify_trail(trail.path, other)
    assert (verdict.ok, verdict.reason, verdict.first_bad_seq) == (False, "wrong_key", 0)
    assert verify_trail(tmp_path / "missing.jsonl", other).reason == "unreadable"
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert verify_trail(tmp_path / "empty.jsonl", other).reason == "empty"
    assert verify_trail(trail.path, tmp_path / "no_such_key.pem").reason == "unreadable"


def test_torn_last_line_is_moved_aside_and_recorded_before_appending(tmp_path):
    from monai_fl_ext.errors import InputError
    from monai_fl_ext.governance import AuditTrail, verify_trail

    trail = _trail(tmp_path, 4)
    trail.path.write_bytes(trail.path.read_bytes()[:-20])
    assert verify_trail(trail.path).reason == "truncated"
    resumed = AuditTrail(trail.path, tmp_path / "keys" / "server.pem")
    resumed.append("job_end", {"status": "completed"})
    verdict = verify_trail(trail.path)
    assert verdict.ok and verdict.events["trail_recovered"] == 1 and verdict.records == 5
    assert list(tmp_path.glob("audit_trail.jsonl.torn-*"))
    lines = _lines(trail.path)
    trail.path.write_bytes(b"".join([lines[0], lines[2], *lines[3:]]))  # a tampered trail is never continued
    with pytest.raises(InputError, match="cannot append"):
        AuditTrail(trail.path, tmp_path / "keys" / "server.pem")


# ---- ledger ----------------------------------------------------------------------------------------
def test_ledger_refuses_anything_but_scalars(tmp_path):
    from monai_fl_ext.errors import InputError
    from monai_fl_ext.governance import ContributionLedger

    ledger = ContributionLedger(tmp_path, "job")
    with pytest.raises(InputError, match="site-2, round 3: field 'update'"):
        ledger.record(3, "site-2", "accepted", update=np.ones(10, dtype=np.float32))
    with pytest.raises(InputError, match="scalars only"):
        ledger.record(3, "site-2", "accepted", update_norm=torch.ones(4))
    entry = ledger.record(3, "site-2", "accepted", update_norm=np.float32(2.5), samples=np.int64(7))
    assert entry["update_norm"] == 2.5 and entry["samples"] == 7
    on_disk = json.loads((tmp_path / "ledger.json").read_text())
    assert on_disk["entries"] == [{"round": 3, "site": "site-2", "status": "accepted", "update_norm": 2.5, "samples": 7}]


def test_no_file_written_holds_a_raw_site_update_and_the_check_can_fail(tiny_job, tmp_path):
    from monai_fl_ext.governance import assert_no_raw_updates, export_version, find_raw_updates
    from monai_fl_ext.governance.report import build_report

    server, updates = tiny_job
    report = build_report(server, tmp_path / "report")
    export_version(server / "governance", "final@round-1", BUNDLE, tmp_path / "exported", torchscript=False)
    last = updates[max(updates)]
    written = [server, tmp_path / "report", tmp_path / "exported"]
    every_update = {f"{site} round {rnd}": u for rnd, per_site in updates.items() for site, u in per_site.items()}
    assert assert_no_raw_updates(written, every_update) >= 10
    assert report["missing"] == []
    # the check finds a leak: a site's update saved as a tensor file, and a few of its values printed as text
    leak = tmp_path / "leak"
    leak.mkdir()
    torch.save({"conv": last["site-2"]["conv1.weight"]}, leak / "update.pt")
    values = last["site-3"]["fc.weight"].ravel()[:20].numpy()
    (leak / "debug.log").write_text("fc.weight " + " ".join(repr(float(v)) for v in values))
    findings = find_raw_updates(leak, last)
    assert {(Path(f.file).name, f.site, f.tensor) for f in findings} >= {("update.pt", "site-2", "conv1.weight"), ("debug.log", "site-3", "fc.weight")}
    with pytest.raises(AssertionError, match="site-2"):
        assert_no_raw_updates(leak, last)


# ---- registry and export ---------------------------------------------------------------------------
def test_registry_versions_lineage_and_hashes(tiny_job):
    from monai_fl_ext.governance import ModelRegistry, tensor_sha256
    from monai_fl_ext.governance.registry import load_state
    from monai_fl_ext.io import sha256_file

    server, _ = tiny_job
    reg = ModelRegistry.open(server / "governance")
    assert [v["version"] for v in reg.versions] == ["initial", "round-0", "best@round-1", "round-1", "final@round-1"]
    assert [v["version"] for v in reg.lineage("final@round-1")] == ["final@round-1", "round-1", "round-0", "initial"]
    assert [v["version"] for v in reg.lineage("best@round-1")] == ["best@round-1", "round-0", "initial"]
    final, best = reg.get("final@round-1"), reg.get("best@round-1")
    assert final["weights_sha256"] == reg.get("round-1")["weights_sha256"] == tensor_sha256(load_state(server / "models" / "final_global_model.pt"))
    assert final["file_sha256"] == sha256_file(server / "models" / "final_global_model.pt")
    assert best["same_weights_as"] == "round-0" and best["metrics"]["val_auc"] == pytest.approx(0.61)
    assert reg.get("round-0")["evaluated_in_round"] == 1  # round 1's validation ran on the round-0 model
    assert final["privacy"]["max_epsilon"] == max(final["privacy"]["epsilon_per_site"].values()) > 0
    assert final["metrics"]["val_auc"] == 0.75 and final["algorithm"] == "fedavg" and final["job_id"] == "tiny-job"
    assert reg.data["job"]["secure_aggregation"] == "off" and reg.data["job"]["status"] == "completed"


def test_export_writes_a_bundle_whose_network_loads_the_model(tiny_job, tmp_path):
    from monai_fl_ext.errors import InputError
    from monai_fl_ext.governance import export_version
    from monai_fl_ext.io import read_json

    server, _ = tiny_job
    out = export_version(server / "governance", "final@round-1", BUNDLE, tmp_path / "cxr_fl", note="consortium release")
    meta = read_json(out / "configs" / "metadata.json")
    old = read_json(BUNDLE / "configs" / "metadata.json")
    assert meta["version"] != old["version"] and list(meta["changelog"])[0] == meta["version"]
    assert "final@round-1" in meta["changelog"][meta["version"]] and "consortium release" in meta["changelog"][meta["version"]]
    assert read_json(out / "configs" / "train.json")["norm"] == "group"  # DP-trained: no BatchNorm statistics
    net = _network(out, norm=None)  # the exported bundle's own config, unchanged
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    net.load_state_dict(state)  # strict
    net.eval()
    x = torch.rand(2, 1, TINY_SIZE, TINY_SIZE)
    scripted = torch.jit.load(str(out / "models" / "model.ts"))
    assert torch.allclose(scripted(x), net(x), atol=1e-5)
    prov = read_json(out / "models" / "provenance.json")
    assert prov["lineage"] == ["final@round-1", "round-1", "round-0", "initial"] and prov["bundle_version"] == meta["version"]
    assert not (out / "eval").exists() and sorted(p.name for p in (out / "models").iterdir()) == ["model.pt", "model.ts", "provenance.json"]
    # a model file altered after registration is refused, and nothing is left half-written
    copy = tmp_path / "job"
    shutil.copytree(server, copy)
    ckpt = copy / "models" / "final_global_model.pt"
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 1
    ckpt.write_bytes(bytes(data))
    with pytest.raises(InputError, match="SHA-256 differs"):
        export_version(copy / "governance", "final@round-1", BUNDLE, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(InputError, match="no model version 'round-9'"):
        export_version(server / "governance", "round-9", BUNDLE, tmp_path / "x")
    with pytest.raises(InputError, match="no saved file"):
        export_version(server / "governance", "round-0", BUNDLE, tmp_path / "x")


# ---- dashboard and report --------------------------------------------------------------------------
def test_report_and_dashboard_of_a_finished_job(tiny_job, tmp_path):
    from monai_fl_ext.governance.report import build_report

    server, _ = tiny_job
    result = build_report(server, tmp_path / "r")
    assert result["verdict"]["ok"] and result["missing"] == []
    assert result["plots"] == ["contributions.png", "drift.png", "metrics.png", "privacy.png"]
    page = Path(result["dashboard"]).read_text()
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page) and "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 4
    for text in ("OK (ok)", "site-1", "site-4", "final@round-1", "no answer within the round", "fedavg"):
        assert text in page, text
    reg = json.loads((server / "governance" / "registry.json").read_text())
    assert all(v["weights_sha256"] in page for v in reg["versions"])
    pdf = Path(result["pdf"]).read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Subtype\s*/Image", pdf)) == 4
    text = _pdf_text(pdf)
    for words in ("Federated job audit report", "Differential privacy per site", "Model versions", "site-4", "secure aggregation", "records verified with key"):
        assert words in text, words
    assert reg["versions"][-1]["file_sha256"][:32] in text  # hashes wrap inside their table cells


def test_report_of_an_incomplete_job_says_what_is_missing(tiny_job, tmp_path):
    from monai_fl_ext.governance.report import build_report
    from monai_fl_ext.io import atomic_write_json

    server = tmp_path / "server"
    shutil.copytree(tiny_job[0], server)
    (server / "models" / "final_global_model.pt").unlink()
    history = json.loads((server / "history.json").read_text())
    history["status"] = "running"
    del history["final"]
    atomic_write_json(server / "history.json", history)
    trail = server / "governance" / "audit_trail.jsonl"
    trail.write_bytes(trail.read_bytes()[:-30])  # the server died mid-append
    result = build_report(server)
    missing = " | ".join(result["missing"])
    assert "no final global model" in missing and "still running" in missing and "truncated" in missing
    assert not result["verdict"]["ok"]
    page = Path(result["dashboard"]).read_text()
    assert "FAILED (truncated)" in page and "no final global model" in page
    assert "no final global model" in _pdf_text(Path(result["pdf"]).read_bytes())
    shutil.rmtree(server / "governance")  # a job that ran without governance still gets a report
    bare = build_report(server, tmp_path / "bare")
    assert any("no model registry" in m for m in bare["missing"]) and bare["verdict"]["reason"] == "unreadable"
    assert Path(bare["pdf"]).stat().st_size > 0


def test_report_cross_checks_registry_and_model_files_against_the_signed_trail(tiny_job, tmp_path):
    from monai_fl_ext.governance.report import build_report
    from monai_fl_ext.io import atomic_write_json

    server = tmp_path / "server"
    shutil.copytree(tiny_job[0], server)
    registry = json.loads((server / "governance" / "registry.json").read_text())
    registry["versions"][1]["weights_sha256"] = "0" * 64  # the registry is not signed: the trail is the reference
    atomic_write_json(server / "governance" / "registry.json", registry)
    _save({"x": torch.ones(3)}, server / "models" / "final_global_model.pt")  # model swapped after the job
    missing = " | ".join(build_report(server)["missing"])
    assert "registry version 'round-0': weights_sha256 differs from the signed audit trail" in missing
    assert "models/final_global_model.pt changed since it was registered as 'final@round-1'" in missing


def test_dashboard_renders_in_headless_chromium(tiny_job, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium binary on this machine (apt-get install chromium)")
    from PIL import Image

    from monai_fl_ext.governance.report import build_report

    result = build_report(tiny_job[0], tmp_path / "r")
    url = Path(result["dashboard"]).resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,2400"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'id="audit-verdict"' in dom.stdout and "OK (ok)" in dom.stdout
    shot = tmp_path / "dashboard.png"
    run = subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[:2] == (2400, 1400) and img.std() > 20  # not a blank page
    green = (img[..., 1] > 230) & (img[..., 0] > 200) & (img[..., 0] < 225) & (img[..., 2] < 235)  # the OK verdict box
    assert green[:300].sum() > 5000


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_exit_codes(tiny_job, tmp_path, capsys):
    from monai_fl_ext.cli import main

    server = tmp_path / "server"
    shutil.copytree(tiny_job[0], server)
    assert main(["audit-verify", str(server)]) == 0
    assert main(["report", str(server), "--out", str(tmp_path / "rep")]) == 0 and (tmp_path / "rep" / "audit_report.pdf").is_file()
    assert main(["registry", "list", str(server)]) == 0 and "final@round-1" in capsys.readouterr().out
    assert main(["registry", "lineage", str(server), "--version", "best@round-1"]) == 0
    assert main(["registry", "export", str(server), "--version", "final@round-1", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "models" / "model.ts").is_file()
    assert main(["registry", "export", str(server), "--version", "nope", "--out", str(tmp_path / "c")]) == 2
    assert main(["audit-verify", str(server), "--public-key", str(tmp_path / "missing.pem")]) == 2
    trail = server / "governance" / "audit_trail.jsonl"
    lines = _lines(trail)
    trail.write_bytes(b"".join(lines[:4] + lines[5:]))
    with pytest.raises(SystemExit) as exc:
        main(["audit-verify", str(trail)])
    assert exc.value.code == 1 and "deleted" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "monai_fl_ext", "audit-verify", str(trail), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and json.loads(proc.stdout)["first_bad_seq"] == 4


# ---- a real FLARE run ------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_federated_run_with_dp_and_secure_aggregation_leaves_verified_governance_records(tiny_cohort, tmp_path):
    from monai_fl_ext.flare.job import FederatedJobSpec, run_simulation
    from monai_fl_ext.governance import ModelRegistry, assert_no_raw_updates, export_version, verify_trail
    from monai_fl_ext.governance.registry import load_state
    from monai_fl_ext.governance.report import build_report

    dataset_dir, _, partition_dir = tiny_cohort
    spec = FederatedJobSpec(bundle="chest_xray_classification", dataset_dir=str(dataset_dir), partition_dir=str(partition_dir),
                            output_dir=str(tmp_path / "fl"), num_rounds=2, cross_site_eval=False, wait_time_after_min_received=60,
                            overrides={"spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16},
                            privacy={"target_epsilon": 8.0, "delta": 1e-3}, secure_aggregation={"bits": 64}, name="gov_secure")
    server = run_simulation(spec, progress=False)
    history = json.loads((server / "history.json").read_text())
    assert history["status"] == "completed" and history["config"]["secure_aggregation"]["bits"] == 64
    # the controller itself wrote the trail, registry and ledger while the job ran
    verdict = verify_trail(server / "governance" / "audit_trail.jsonl", server / "governance" / "audit_trail.jsonl.pub.pem")
    assert verdict.ok and verdict.complete and verdict.events["update_accepted"] == 6 and verdict.events["aggregated"] == 2
    reg = ModelRegistry.open(server / "governance")
    final = reg.get("final@round-1")
    assert [v["version"] for v in reg.lineage("final@round-1")][:3] == ["final@round-1", "round-1", "round-0"]
    assert 7.5 < final["privacy"]["max_epsilon"] <= 8.0 + 1e-6 and set(final["privacy"]["epsilon_per_site"]) == set(SITES)
    assert reg.data["job"]["secure_aggregation"]["bits"] == 64
    ledger = json.loads((server / "governance" / "ledger.json").read_text())
    assert len(ledger["entries"]) == 6
    for e in ledger["entries"]:  # under secure aggregation: only what each site reports about itself
        assert e["reported_norm"] > 0 and e["epsilon"] > 0 and e["samples"] > 0, e
        assert "update_norm" not in e and "cosine_to_aggregate" not in e, e
    result = build_report(server)
    assert result["verdict"]["ok"] and result["missing"] == [] and "privacy.png" in result["plots"]
    assert "bits 64" in Path(result["dashboard"]).read_text()
    out = export_version(server / "governance", "final@round-1", BUNDLE, tmp_path / "bundle_out")
    net = _network(out, norm=None)
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    # the sites' own trained weights never reach the governance outputs or the exported bundle
    site_models = {p.parts[-3]: load_state(p) for p in (tmp_path / "fl" / "sites").glob("site-*/models/model.pt")}
    assert set(site_models) == set(SITES)
    assert assert_no_raw_updates([server, out], site_models) > 5


def test_secure_aggregation_job_records_only_what_sites_report(tmp_path):
    from monai_fl_ext.governance import GovernanceRecorder, verify_trail
    from monai_fl_ext.governance.report import build_report
    from monai_fl_ext.io import atomic_write_json

    server = tmp_path / "server"
    secagg = {"bits": 32, "clip_range": 8.0, "max_weight": 4096.0, "threshold": 2, "report_counts": True}
    config = {"algorithm": "fedavg", "num_rounds": 1, "weighting": "steps", "secure_aggregation": secagg}
    rec = GovernanceRecorder(server / "governance", job_id="secagg-job")
    rec.job_start(config, sites=list(SITES))
    rec.round_start(0, SITES)
    for i, s in enumerate(SITES):
        rec.update_accepted(0, s, {"reported_norm": 1.0 + i, "samples": 10, "local_steps": 2})
    record = {"round": 0, "sites_ok": list(SITES), "sites_failed": {}, "weights": {}, "aggregated": True,
              "update_norm": {s: 1.0 + i for i, s in enumerate(SITES)}, "global_metrics": {},
              "secure_aggregation": {**secagg, "contributors": list(SITES), "dropped": [], "aborted": None}}
    rec.aggregated(0, record)
    rec.round_start(1, SITES)
    rec.budget_refusal(1, "site-2", {"detail": "epsilon 8.1 would exceed budget 8.0", "epsilon": 7.9, "budget_epsilon": 8.0})
    rec.job_end("stopped at round 1: privacy budget reached at site-2")
    atomic_write_json(server / "history.json", {"config": config, "rounds": [record], "status": "stopped at round 1: privacy budget reached at site-2"})
    entries = json.loads((server / "governance" / "ledger.json").read_text())["entries"]
    accepted = [e for e in entries if e["status"] == "accepted"]
    assert [e["reported_norm"] for e in accepted] == [1.0, 2.0, 3.0]
    assert all("update_norm" not in e and "cosine_to_aggregate" not in e for e in accepted)
    assert any(e["status"] == "rejected" and "privacy budget" in e["reason"] for e in entries)
    verdict = verify_trail(server / "governance" / "audit_trail.jsonl")
    assert verdict.ok and verdict.events["budget_refusal"] == 1
    result = build_report(server)
    assert "drift.png" not in result["plots"] and not any("plot" in m for m in result["missing"])
    assert any("no final global model" in m for m in result["missing"])
    page = Path(result["dashboard"]).read_text()
    assert "clip_range 8" in page and "threshold 2" in page
