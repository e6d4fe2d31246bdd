"""Shared fixtures: one tiny synthetic cohort, its datalist and a 3-site partition per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "chest_xray_classification"
TINY_SIZE = 32


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """(dataset_dir, datalist_path, partition_dir) of a 60-patient, 32 px synthetic cohort."""
    from monai_fl_ext.data.synthetic import SyntheticSpec
    from monai_fl_ext.demo import prepare_synthetic

    work = tmp_path_factory.mktemp("tiny_cohort")
    spec = SyntheticSpec(num_patients=60, image_size=TINY_SIZE, seed=3, mean_followups=1.0)
    return prepare_synthetic(work, spec, num_sites=3, alpha=1.0, progress=False)


@pytest.fixture(scope="session")
def tiny_overrides(tiny_cohort):
    """Bundle overrides for fast runs on the tiny cohort (outputs under a run dir chosen per test)."""
    dataset_dir, datalist, _ = tiny_cohort
    return {"dataset_dir": str(dataset_dir), "datalist": str(datalist), "spatial_size": [TINY_SIZE, TINY_SIZE], "batch_size": 16}
