"""Smoke test of the benchmark runner: ``python -m benchmarks.run data_pipeline --quick`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_data_pipeline_quick_writes_results(tmp_path):
    out, docs = tmp_path / "results", tmp_path / "benchmarks.md"
    cmd = [sys.executable, "-m", "benchmarks.run", "data_pipeline", "--quick", "--threads", "1", "--out", str(out), "--docs", str(docs)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    result = json.loads((out / "data_pipeline.json").read_text())
    for key in ("name", "description", "command", "environment", "params", "rows", "summary"):
        assert key in result, key
    assert result["name"] == "data_pipeline"
    assert result["command"].startswith("python -m benchmarks.run data_pipeline --quick")
    assert result["params"]["quick"] is True and result["params"]["patients"] == 30
    for key in ("torch", "monai", "torch_threads", "cpu_count", "platform"):
        assert key in result["environment"], key
    assert result["environment"]["torch_threads"] == 1
    # 2 sizes x 3 pipelines, each with a positive throughput and ratio
    assert {(r["spatial_size"], r["pipeline"]) for r in result["rows"]} == {
        (s, p) for s in (64, 224) for p in ("uncached", "cached", "cached+random")
    }
    assert all(r["images_per_s"] > 0 and r["speedup_vs_uncached"] > 0 for r in result["rows"])
    for size in (64, 224):
        assert result["summary"][f"cached_vs_uncached_{size}px_1thr"] > 0

    md = (out / "data_pipeline.md").read_text()
    assert "| spatial_size |" in md and result["command"] in md
    page = docs.read_text()
    assert page.startswith("# Benchmarks") and "`data_pipeline`" in page


def test_runner_help_and_unknown_name():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    help_ = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=REPO, capture_output=True, text=True, env=env)
    assert help_.returncode == 0 and "central_auc" in help_.stdout and "--quick" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.run", "nope"], cwd=REPO, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown benchmark" in bad.stderr
