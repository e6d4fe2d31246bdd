"""Tests for monai_fl_ext.cli: help texts, generate/partition happy paths, and exit status 2 on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_fl_ext.cli import build_parser, main

SUBCOMMANDS = ("generate", "load-nih", "load-medmnist", "partition", "central", "demo", "federated", "compare", "dp-sweep",
               "audit-verify", "report", "registry", "stress", "load-dti", "dti-consortium")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A 12-patient synthetic cohort written by ``generate``; returns its datalist path."""
    out = tmp_path_factory.mktemp("gen") / "d"
    assert main(["generate", "--out", str(out), "--patients", "12", "--quiet"]) == 0
    return out / "datalist.json"


def test_top_level_help_runs_as_module():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "monai_fl_ext", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "monai-fl-ext" in result.stdout
    assert "Federated" in result.stdout
    for name in SUBCOMMANDS:
        assert name in result.stdout


def _subparsers() -> dict:
    return next(a for a in build_parser()._actions if a.dest == "command").choices


def test_every_subcommand_is_registered():
    assert set(_subparsers()) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert f"monai-fl-ext {command}" in out
    description = _subparsers()[command].description
    # argparse re-wraps the description (also at hyphens), so compare without whitespace
    assert description and "".join(description.split()) in "".join(out.split())
    assert "--" in out  # lists its options


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_generate_writes_datalist(generated, capsys):
    out = generated.parent
    assert (out / "Data_Entry_2017.csv").is_file()
    datalist = json.loads(generated.read_text())
    items = [item for split in ("training", "validation", "test") for item in datalist[split]]
    assert len({item["patient"] for item in items}) == 12
    assert all((out / item["image"]).is_file() for item in items)
    assert all(item["site"].startswith("hospital-") for item in items)


def test_partition_iid(generated, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["partition", str(generated), "--out", str(out), "--sites", "3", "--strategy", "iid"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["sites"]) == 3
    stdout = capsys.readouterr().out
    assert "site-1" in stdout and "wrote" in stdout


def _assert_bad_input(argv: list[str], out: Path, capsys, *needles: str) -> str:
    status = main(argv)
    captured = capsys.readouterr()
    assert status == 2
    assert captured.err.startswith("error: ")
    for needle in needles:
        assert needle in captured.err, captured.err
    assert "Traceback" not in captured.err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary leftovers
    return captured.err


def test_partition_rejects_alpha_zero(generated, tmp_path, capsys):
    out = tmp_path / "p"
    _assert_bad_input(["partition", str(generated), "--out", str(out), "--alpha", "0"], out, capsys, "alpha")


def test_partition_rejects_more_sites_than_patients(generated, tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["partition", str(generated), "--out", str(out), "--sites", "50", "--strategy", "iid"]
    _assert_bad_input(argv, out, capsys, "num_sites", "50", "12")


def test_partition_rejects_missing_datalist(tmp_path, capsys):
    out = tmp_path / "p"
    _assert_bad_input(["partition", str(tmp_path / "nope.json"), "--out", str(out)], out, capsys, "nope.json")


def test_load_nih_rejects_unknown_label(tmp_path, capsys):
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    rows = [
        ("00000001_000.png", "No Finding", "1"),
        ("00000002_000.png", "Cardiomegally", "2"),  # misspelt, on CSV line 3
    ]
    csv_text = "Image Index,Finding Labels,Patient ID\n" + "".join(",".join(r) + "\n" for r in rows)
    (root / "Data_Entry_2017.csv").write_text(csv_text)
    for name, _, _ in rows:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "images" / name)
    out = root / "datalist.json"
    err = _assert_bad_input(["load-nih", str(root)], out, capsys, "Data_Entry_2017.csv:3", "Cardiomegally")
    assert "unknown label" in err


def test_load_medmnist_rejects_non_npz(tmp_path, capsys):
    npz = tmp_path / "chestmnist.npz"
    npz.write_text("this is not an npz archive\n")
    out = tmp_path / "m"
    _assert_bad_input(["load-medmnist", str(npz), "--out", str(out)], out, capsys, str(npz), "npz")


def test_load_medmnist_rejects_missing_file(tmp_path, capsys):
    out = tmp_path / "m"
    _assert_bad_input(["load-medmnist", str(tmp_path / "none.npz"), "--out", str(out)], out, capsys, "none.npz")


def test_federated_export_accepts_relative_paths(tmp_path, monkeypatch):
    """Users type relative paths; the job is built from FLARE's folder, so they must be resolved first."""
    import json

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--out", "data", "--patients", "12", "--quiet"]) == 0
    assert main(["partition", "data/datalist.json", "--out", "part", "--sites", "2", "--strategy", "iid"]) == 0
    assert main(["federated", "--dataset-dir", "data", "--datalist", "data/datalist.json", "--partition", "part",
                 "--out", "run", "--mode", "export", "--export-dir", "jobs", "--rounds", "1"]) == 0
    spec = json.loads((tmp_path / "run" / "job_spec.json").read_text())
    assert spec["partition_dir"] == str(tmp_path / "part") and (tmp_path / "jobs" / "monai_fl_ext" / "meta.json").is_file()
