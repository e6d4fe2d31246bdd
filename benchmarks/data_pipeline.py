"""Images/s through the bundle's preprocessing: uncached vs cached vs cached + random augmentation."""

from __future__ import annotations

import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from benchmarks.common import bundle_parser, command, environment, sig
from benchmarks.timing import interleaved, with_threads

NAME = "data_pipeline"
DESCRIPTION = (
    "Images/s of one training epoch through the bundle's preprocessing, built from "
    "`train.json` with `monai.bundle.ConfigParser` and iterated with a `num_workers=0` DataLoader "
    "(batch `@batch_size`, shuffled): **uncached** (`monai.data.Dataset` + `deterministic_transforms`: "
    "PNG decode, resize, scale on every epoch), **cached** (`CacheDataset` + `deterministic_transforms`, "
    "timed after the cache is filled) and **cached+random** (the bundle's real `train#dataloader`: "
    "`CacheDataset` over `deterministic_transforms + random_transforms`, so RandAffine and noise still "
    "run every epoch). Synthetic cohort rendered at the target size (64 px and 224 px source PNGs). "
    "Timed at the run's torch thread count and, when that is above 1, again at 1 thread. "
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


def _key(size: int, pipeline: str, threads: int) -> str:
    return f"{size}px/{pipeline}/{threads}thr"


def _warm(loader) -> None:
    """Run one batch through ``loader`` so lazy imports and first-call set-up are not timed."""
    next(iter(loader))


def _epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += int(batch["image"].shape[0])
    return n


def thread_settings(quick: bool) -> list[int]:
    """Torch thread counts to time: the run's own, plus 1 (what DataLoader worker processes use) unless quick."""
    import torch

    current = torch.get_num_threads()
    return [current] if quick or current == 1 else [current, 1]


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``data_pipeline`` (see :data:`DESCRIPTION`)."""
    from monai.utils import set_determinism

    from monai_fl_ext.data.nih import build_nih_datalist
    from monai_fl_ext.data.synthetic import SyntheticSpec, generate_synthetic_cxr

    patients = args.patients or (30 if args.quick else 150)
    repeats = args.repeats or (2 if args.quick else 3)
    threads = thread_settings(args.quick)
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
                for t in threads:
                    key = _key(size, pipeline, t)
                    with_threads(lambda ld=loader: _warm(ld), t)()
                    variants[key] = with_threads(lambda ld=loader: _epoch(ld), t)
                    info[key] = {"images": n_images, "cache_fill_s": fill if pipeline != "uncached" else None}
        timings = interleaved(variants, repeats=repeats, warmup=0)  # warmed by one batch each above
    for size in SIZES:
        for t in threads:
            for pipeline in PIPELINES:
                key = _key(size, pipeline, t)
                seconds = timings.median(key)
                n = info[key]["images"]
                rows.append(
                    {
                        "spatial_size": size,
                        "torch_threads": t,
                        "pipeline": pipeline,
                        "images_per_epoch": n,
                        "images_per_s": sig(n / seconds),
                        "ms_per_image": sig(1000 * seconds / n),
                        "speedup_vs_uncached": sig(timings.paired_ratio(_key(size, "uncached", t), key), 3),
                        "cache_fill_s": sig(info[key]["cache_fill_s"], 3),
                        "spread": sig(timings.spread(key), 2),
                    }
                )
    summary: dict[str, Any] = {}
    for t in threads:
        for size in SIZES:
            ratio = lambda a, b: sig(timings.paired_ratio(_key(size, a, t), _key(size, b, t)), 3)  # noqa: E731
            summary[f"cached_vs_uncached_{size}px_{t}thr"] = ratio("uncached", "cached")
            summary[f"train_pipeline_vs_uncached_{size}px_{t}thr"] = ratio("uncached", "cached+random")
            summary[f"random_aug_cost_vs_cached_{size}px_{t}thr"] = ratio("cached+random", "cached")
    if len(threads) > 1:
        for size in SIZES:
            for pipeline in PIPELINES:
                summary[f"one_thread_speedup_{size}px_{pipeline}"] = sig(
                    timings.paired_ratio(_key(size, pipeline, threads[0]), _key(size, pipeline, 1)), 3
                )
    notes = [
        "speedup_vs_uncached > 1: the variant's epoch is that many times faster than re-decoding every image "
        "(same thread count); random_aug_cost_vs_cached_*: how many times slower the real train pipeline "
        "(cached + RandAffine + noise) is than a cached epoch without augmentation.",
        "one_thread_speedup_*: epoch time with torch's thread count divided by epoch time with 1 torch thread "
        "(DataLoader worker processes run with 1 thread). Above 1 means the extra threads hurt, as they do when "
        "the machine's cores are busy with other work: every small tensor op then waits on an OpenMP barrier.",
        "spread = (max - min) / median of the per-epoch times: the run's noise level on this shared machine.",
    ]
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, args, patients=patients, repeats=repeats),
        "environment": env,
        "params": {
            "patients": patients,
            "repeats": repeats,
            "warmup": "one batch per variant",
            "sizes": list(SIZES),
            "torch_threads": threads,
            "num_workers": 0,
            "quick": bool(args.quick),
        },
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
