"""Images/s through the bundle's preprocessing: uncached vs cached vs cached + random augmentation."""

from __future__ import annotations

import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from benchmarks.common import bundle_parser, command, environment, sig
from benchmarks.timing import interleaved

NAME = "data_pipeline"
DESCRIPTION = (
    "Images/s of one training epoch through the bundle's preprocessing, built from "
    "`train.json` with `monai.bundle.ConfigParser` and iterated with a `num_workers=0` DataLoader "
    "(batch `@batch_size`, shuffled): **uncached** (`monai.data.Dataset` + `deterministic_transforms`: "
    "PNG decode, resize, scale on every epoch), **cached** (`CacheDataset` + `deterministic_transforms`, "
    "timed after the cache is filled) and **cached+random** (the bundle's real `train#dataloader`: "
    "`CacheDataset` over `deterministic_transforms + random_transforms`, so RandAffine and noise still "
    "run every epoch). Synthetic cohort rendered at the target size (64 px and 224 px source PNGs). "
    "`speedup_vs_uncached` is the median over rounds of the per-round time ratio uncached / variant."
)
SIZES = (64, 224)
PIPELINES = ("uncached", "cached", "cached+random")


def _loader(parser_overrides: dict[str, Any], pipeline: str):
    """The bundle's ``train#dataloader`` with its dataset/transforms swapped for ``pipeline``."""
    overrides = dict(parser_overrides)
    if pipeline in ("uncached", "cached"):
        overrides["train#preprocessing#transforms"] = "$@deterministic_transforms"
    if pipeline == "uncached":
        overrides["train#dataset"] = {"_target_": "Dataset", "data": "@train#data", "transform": "@train#preprocessing"}
    parser = bundle_parser(overrides)
    start = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")  # CacheDataset fills its cache here
    fill = time.perf_counter() - start
    return parser.get_parsed_content("train#dataloader"), len(dataset), fill


def _epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += int(batch["image"].shape[0])
    return n


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``data_pipeline`` (see :data:`DESCRIPTION`)."""
    from monai.utils import set_determinism

    from monai_fl_ext.data.nih import build_nih_datalist
    from monai_fl_ext.data.synthetic import SyntheticSpec, generate_synthetic_cxr

    patients = args.patients or (30 if args.quick else 150)
    repeats = args.repeats or (2 if args.quick else 5)
    env = environment()
    set_determinism(seed=0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_data_pipeline_") as tmp:
        variants, info = {}, {}
        for size in SIZES:
            root = generate_synthetic_cxr(Path(tmp) / f"cxr{size}", SyntheticSpec(num_patients=patients, image_size=size, seed=0), progress=False)
            build_nih_datalist(root, out_path=root / "datalist.json", seed=0)
            overrides = {"spatial_size": [size, size], "dataset_dir": str(root), "datalist": str(root / "datalist.json")}
            for pipeline in PIPELINES:
                loader, n_images, fill = _loader(overrides, pipeline)
                key = f"{size}/{pipeline}"
                variants[key] = (lambda ld=loader: _epoch(ld))
                info[key] = {"images": n_images, "cache_fill_s": fill if pipeline != "uncached" else None}
        timings = interleaved(variants, repeats=repeats, warmup=1)
        for size in SIZES:
            base = f"{size}/uncached"
            for pipeline in PIPELINES:
                key = f"{size}/{pipeline}"
                seconds = timings.median(key)
                n = info[key]["images"]
                rows.append(
                    {
                        "spatial_size": size,
                        "source_px": size,
                        "pipeline": pipeline,
                        "images_per_epoch": n,
                        "images_per_s": sig(n / seconds),
                        "ms_per_image": sig(1000 * seconds / n),
                        "speedup_vs_uncached": sig(timings.paired_ratio(base, key), 3),
                        "cache_fill_s": sig(info[key]["cache_fill_s"], 3),
                        "spread": sig(timings.spread(key), 2),
                    }
                )
    summary: dict[str, Any] = {}
    for size in SIZES:
        summary[f"cached_vs_uncached_{size}px"] = sig(timings.paired_ratio(f"{size}/uncached", f"{size}/cached"), 3)
        summary[f"train_pipeline_vs_uncached_{size}px"] = sig(timings.paired_ratio(f"{size}/uncached", f"{size}/cached+random"), 3)
        summary[f"random_aug_cost_vs_cached_{size}px"] = sig(timings.paired_ratio(f"{size}/cached+random", f"{size}/cached"), 3)
    notes = [
        "speedup_vs_uncached > 1 means the variant runs that many times faster than re-decoding every epoch; "
        "random_aug_cost_vs_cached_* is how many times slower the real train pipeline is than a cached, augmentation-free epoch.",
        "spread = (max - min) / median of the per-epoch times: the run's noise level on this shared machine.",
    ]
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, Namespace(quick=args.quick, patients=patients, repeats=repeats), ("patients", "repeats")),
        "environment": env,
        "params": {"patients": patients, "repeats": repeats, "warmup": 1, "sizes": list(SIZES), "num_workers": 0, "quick": bool(args.quick)},
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
