"""What every benchmark shares: the environment record, the bundle's config, the reproduce command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "chest_xray_classification"


def environment() -> dict[str, Any]:
    """Versions, threads, CPUs, platform and the machine's load when the benchmark ran."""
    import monai
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "git_commit": commit,
    }


def command(name: str, args: Any, **options: Any) -> str:
    """The exact command line that reproduces benchmark ``name``.

    ``--quick`` and ``--threads`` are taken from ``args`` (the runner's namespace); ``options`` are the
    benchmark's resolved settings (``epochs=8`` -> ``--epochs 8``), so defaults are spelled out too.
    """
    parts = ["python", "-m", "benchmarks.run", name]
    if getattr(args, "quick", False):
        parts.append("--quick")
    if getattr(args, "threads", None):
        parts += ["--threads", str(args.threads)]
    for opt, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + opt.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def bundle_parser(overrides: Mapping[str, Any] | None = None):
    """A ``ConfigParser`` holding the bundle's ``train.json`` with ``overrides`` applied (CPU device)."""
    from monai.bundle import ConfigParser

    from monai_fl_ext.bundle import TRAIN_CONFIG, resolve_bundle

    root = resolve_bundle(BUNDLE)
    parser = ConfigParser()
    parser.read_config(str(root / TRAIN_CONFIG))
    parser.update({"bundle_root": str(root), "device": "$torch.device('cpu')", **dict(overrides or {})})
    return parser


def sig(x: float | None, digits: int = 4) -> float | None:
    """``x`` rounded to ``digits`` significant digits (stable, readable JSON)."""
    if x is None:
        return None
    return float(f"{x:.{digits}g}")


# The demo cohort every FL benchmark runs on: monai_fl_ext.demo.prepare_synthetic(workdir, spec, 3, 0.5), seed 0.
DEMO_COHORT = {"num_hospitals": 3, "dirichlet_alpha": 0.5, "seed": 0}


def fl_sizes(args: Any, quick_rounds: int, rounds: int, local_epochs: int = 1) -> tuple[int, int, int, int]:
    """``(patients, image_size, rounds, local_epochs)`` of an FL benchmark: the CLI's values, else quick or full defaults."""
    quick = bool(args.quick)
    return (
        args.patients or (60 if quick else 500),
        args.image_size or (32 if quick else 64),
        args.rounds or (quick_rounds if quick else rounds),
        args.local_epochs or (1 if quick else local_epochs),
    )


def demo_cohort(work: Any, patients: int, image_size: int) -> tuple[Any, Any, Any]:
    """The demo cohort under ``work``: ``(dataset_dir, datalist, partition_dir)`` (see :data:`DEMO_COHORT`)."""
    from monai_fl_ext.data.synthetic import SyntheticSpec
    from monai_fl_ext.demo import prepare_synthetic

    spec = SyntheticSpec(num_patients=patients, image_size=image_size, num_hospitals=3, seed=0)
    # the demo's min_site_size (20 training images per hospital) cannot be met by a quick-sized cohort
    return prepare_synthetic(work, spec, 3, 0.5, progress=False, min_site_size=5 if patients < 200 else 20)


def training_parts(overrides: dict[str, Any], batch_size: int) -> tuple[Any, Any, Any, Any, Any]:
    """The bundle's network, loss and optimizer (from ``train.json`` with ``overrides``) and a fixed random batch."""
    import torch

    parser = bundle_parser(overrides)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network").train()
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    classes = parser.get_parsed_content("num_classes")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, *overrides["spatial_size"], generator=g)
    y = (torch.rand(batch_size, classes, generator=g) < 0.1).float()
    return network, loss_fn, optimizer, x, y


def benchmark_workdir(args: Any, name: str) -> tuple[Path, Any]:
    """``(work folder, temporary directory or None)``: ``--workdir/NAME`` kept, else a temporary folder to clean up."""
    import tempfile

    if getattr(args, "workdir", None):
        work = Path(args.workdir).resolve() / name
        work.mkdir(parents=True, exist_ok=True)
        return work, None
    tmp = tempfile.TemporaryDirectory(prefix=f"bench_{name}_")
    return Path(tmp.name), tmp
