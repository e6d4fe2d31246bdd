"""The chest X-ray bundle is a plain MONAI bundle: MONAI's own checks and CLI work on it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLE, TINY_SIZE

CONFIGS = BUNDLE / "configs"


def _cli_overrides(overrides: dict, run_dir: Path) -> list[str]:
    args = []
    for key, value in {**overrides, "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "eval")}.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return args


def _monai_bundle(*args: str, cwd: Path = BUNDLE, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_metadata_has_model_zoo_fields():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "task", "description", "authors", "copyright", "data_source", "data_type", "label_classes",
                "network_data_format", "eval_metrics", "intended_use"):
        assert meta.get(key), key
    assert meta["version"] in meta["changelog"]
    labels = json.loads((CONFIGS / "train.json").read_text())["labels"]
    outputs = meta["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == len(labels) == 14
    assert list(outputs["channel_def"].values()) == labels
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json", "logging.conf"):
        assert (CONFIGS / name).is_file()
    for name in ("docs/README.md", "docs/data_license.txt", "LICENSE"):
        assert (BUNDLE / name).is_file(), name


def test_deterministic_and_random_transforms_are_separate():
    train = json.loads((CONFIGS / "train.json").read_text())
    random_names = {t["_target_"] for t in train["random_transforms"]}
    assert all(name.startswith("Rand") for name in random_names)
    assert not any(t["_target_"].startswith("Rand") for t in train["deterministic_transforms"])
    assert "set_determinism" in train["initialize"][0]


@pytest.mark.parametrize("workflow_type,configs", [("train", ["train.json"]), ("infer", ["inference.json"])])
def test_check_properties_reports_nothing_missing(workflow_type, configs, tiny_overrides, tmp_path):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs], meta_file=str(CONFIGS / "metadata.json"), logging_file=False,
        workflow_type=workflow_type, bundle_root=str(BUNDLE), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), **tiny_overrides,
    )
    workflow.initialize()
    assert not workflow.check_properties()


def test_verify_net_in_out():
    out = _monai_bundle("verify_net_in_out", "--net_id", "network_def", "--meta_file", "configs/metadata.json",
                        "--config_file", "configs/train.json")
    assert "verified" in (out.stdout + out.stderr)


@pytest.mark.slow
def test_train_evaluate_infer_export_with_stock_monai_cli(tiny_cohort, tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    _monai_bundle("run", "--config_file", "configs/train.json", "--bundle_root", str(BUNDLE),
                  "--train#trainer#max_epochs", "2", *_cli_overrides(tiny_overrides, run_dir))
    assert (run_dir / "models" / "model.pt").is_file() and (run_dir / "models" / "model_final.pt").is_file()
    assert list((run_dir / "eval").glob("events.out.tfevents.*")), "TensorBoard logs missing"

    _monai_bundle("run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--bundle_root", str(BUNDLE),
                  *_cli_overrides(tiny_overrides, run_dir))
    metrics = (run_dir / "eval" / "metrics.csv").read_text()
    assert "val_auc" in metrics and "val_auc_per_label" in metrics
    values = dict(line.split("\t", 1) for line in metrics.splitlines())
    assert 0.0 <= float(values["val_auc"]) <= 1.0
    assert "Cardiomegaly" in values["val_auc_per_label"]

    _monai_bundle("run", "--config_file", "configs/inference.json", "--bundle_root", str(BUNDLE),
                  *_cli_overrides({k: v for k, v in tiny_overrides.items() if k != "batch_size"}, run_dir))
    rows = list(csv.reader((run_dir / "eval" / "predictions.csv").open()))
    test_items = json.loads(Path(tiny_overrides["datalist"]).read_text())["test"]
    assert len(rows) == len(test_items)
    assert all(len(r) == 15 and 0.0 <= float(r[1]) <= 1.0 for r in rows)

    ts_path = run_dir / "model.ts"
    _monai_bundle("ckpt_export", "network_def", "--filepath", str(ts_path), "--ckpt_file", str(run_dir / "models" / "model.pt"),
                  "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json")
    scripted = torch.jit.load(str(ts_path))
    from monai_fl_ext.bundle import load_checkpoint
    from monai_fl_ext.networks import resnet18

    eager = load_checkpoint(resnet18(), run_dir / "models" / "model.pt").eval()
    x = torch.rand(2, 1, TINY_SIZE, TINY_SIZE)
    torch.testing.assert_close(scripted(x), eager(x))


@pytest.mark.slow
def test_multi_gpu_config_runs_two_gloo_processes_with_torchrun(tiny_overrides, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m", "monai.bundle", "run",
           "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", "--bundle_root", str(BUNDLE),
           "--train#trainer#max_epochs", "1", "--backend", "gloo", *_cli_overrides(tiny_overrides, run_dir)]
    result = subprocess.run(cmd, cwd=BUNDLE, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / "models" / "model_final.pt").is_file()
    from monai_fl_ext.bundle import load_checkpoint
    from monai_fl_ext.networks import resnet18

    state = torch.load(run_dir / "models" / "model_final.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "MONAI's CheckpointSaver should unwrap DDP"
    load_checkpoint(resnet18(), run_dir / "models" / "model_final.pt")


@pytest.mark.slow
def test_dp_overlay_trains_with_opacus_under_stock_monai_cli(tiny_overrides, tmp_path):
    run_dir = tmp_path / "dp"
    out = _monai_bundle("run", "--config_file", "['configs/train.json','configs/train_dp.json']", "--bundle_root", str(BUNDLE),
                        "--train#trainer#max_epochs", "1", "--dp#delta", "0.001", *_cli_overrides(tiny_overrides, run_dir))
    line = next(line for line in out.stdout.splitlines() if line.startswith("DP-SGD: epsilon"))
    assert float(line.split()[2]) > 0
    from monai_fl_ext.bundle import load_checkpoint
    from monai_fl_ext.networks import resnet18

    load_checkpoint(resnet18(norm="group"), run_dir / "models" / "model_final.pt")  # plain keys, GroupNorm weights
