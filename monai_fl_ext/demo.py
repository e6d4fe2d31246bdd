"""The main job on built-in synthetic data: generate, partition into hospitals, train, report."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from monai_fl_ext.data.nih import build_nih_datalist
from monai_fl_ext.data.synthetic import SyntheticSpec, generate_synthetic_cxr
from monai_fl_ext.partition import write_partition

BUNDLE = "chest_xray_classification"


def prepare_synthetic(
    workdir: str | os.PathLike,
    spec: SyntheticSpec,
    num_sites: int = 3,
    alpha: float = 0.5,
    progress: bool = True,
    min_site_size: int = 20,
    partition_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path, Path]:
    """Generate a synthetic ChestX-ray14 cohort, its datalist and a Dirichlet partition into hospitals.

    Args:
        workdir: data goes to ``workdir/data``.
        spec: the synthetic cohort.
        num_sites: hospitals.
        alpha: Dirichlet label-skew concentration.
        progress: show progress bars.
        min_site_size: minimum training images per hospital.
        partition_dir: where the partition goes (default ``workdir/partition``).

    Returns:
        ``(dataset_dir, datalist_path, partition_dir)``.
    """
    workdir = Path(workdir)
    dataset_dir = generate_synthetic_cxr(workdir / "data", spec, progress=progress)
    datalist = dataset_dir / "datalist.json"
    build_nih_datalist(dataset_dir, out_path=datalist, seed=spec.seed)
    partition_dir = write_partition(
        datalist, partition_dir or workdir / "partition", num_sites=num_sites, strategy="dirichlet", alpha=alpha, seed=spec.seed, min_site_size=min_site_size
    )
    return dataset_dir, datalist, partition_dir


def run_demo(
    workdir: str | os.PathLike,
    num_patients: int = 500,
    image_size: int = 64,
    rounds: int = 8,
    local_epochs: int = 1,
    algorithms: Sequence[str] = ("fedavg",),
    num_sites: int = 3,
    alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    partitions_root: str | os.PathLike = "partitions",
) -> dict[str, Any]:
    """Synthetic cohort, Dirichlet partition into hospitals, central baseline and federated runs, compared.

    The partition goes to ``partitions_root/synthetic-cxr-...``; the generator and the partition tool
    are deterministic, so re-running the demo rewrites the committed partition byte for byte.

    Returns:
        The comparison summary (also ``workdir/runs/compare.{json,md}`` and ``convergence.png``).
    """
    from monai_fl_ext.federated import run_compare
    from monai_fl_ext.flare.job import FederatedJobSpec

    spec = SyntheticSpec(num_patients=num_patients, image_size=image_size, num_hospitals=num_sites, seed=seed)
    partition_dir = Path(partitions_root) / f"synthetic-cxr-{num_patients}p-{image_size}px-dirichlet-{alpha}-{num_sites}sites-seed{seed}"
    dataset_dir, datalist, partition_dir = prepare_synthetic(workdir, spec, num_sites, alpha, progress, partition_dir=partition_dir)
    job = FederatedJobSpec(
        bundle=BUNDLE, dataset_dir=str(dataset_dir), partition_dir=str(partition_dir), output_dir=str(Path(workdir) / "runs"),
        num_rounds=rounds, local_epochs=local_epochs, overrides={"spatial_size": [image_size, image_size], "seed": seed},
    )
    return run_compare(job, datalist, list(algorithms), progress=progress)
