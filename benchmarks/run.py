"""Run named benchmarks and write their results: ``python -m benchmarks.run NAME [NAME ...] | all``.

Each benchmark is a function ``(argparse.Namespace) -> dict`` in :data:`REGISTRY`. Its result dict
holds ``name``, ``description``, ``command`` (the exact command reproducing it), ``environment``,
``params``, ``rows`` and ``summary`` (optionally ``notes`` and extra ``tables``). The runner writes
``<out>/<name>.json`` and ``<out>/<name>.md`` and regenerates ``docs/benchmarks.md`` from every
``*.json`` result in ``<out>``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import (
    central_auc,
    central_training,
    data_pipeline,
    dp_step,
    dp_utility,
    dti_fl,
    fl_overhead,
    fl_vs_central,
    secagg_cost,
    secagg_fl,
)
from benchmarks.common import REPO
from benchmarks.report import docs_markdown, result_markdown

REGISTRY: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    data_pipeline.NAME: data_pipeline.run,
    central_training.NAME: central_training.run,
    central_auc.NAME: central_auc.run,
    fl_vs_central.NAME: fl_vs_central.run,
    fl_overhead.NAME: fl_overhead.run,
    dp_step.NAME: dp_step.run,
    dp_utility.NAME: dp_utility.run,
    secagg_cost.NAME: secagg_cost.run,
    secagg_fl.NAME: secagg_fl.run,
    dti_fl.NAME: dti_fl.run,
}
SUMMARIES = {
    data_pipeline.NAME: "images/s through the bundle's transforms: uncached vs cached vs cached+random, 64 and 224 px (~1-3 min)",
    central_training.NAME: "ResNet-18 train-step throughput by size (64/224), norm (batch/group), stem stride (2/1) (~2-4 min)",
    central_auc.NAME: "central baseline test macro/per-label/per-site AUC on the 500-patient synthetic demo cohort (~3-10 min)",
    fl_vs_central.NAME: "FL (fedavg, fedprox, scaffold; 3 Dirichlet hospitals, 8 rounds) vs central test macro AUC, target ratio >= 0.98 (~20-35 min)",
    fl_overhead.NAME: "FLARE simulation vs the same one-site training without FLARE, interleaved: wall-time ratio, target <= 1.15 (~10-15 min)",
    dp_step.NAME: "DP-SGD (Opacus) train step vs the non-private GroupNorm step, interleaved: time and peak-memory ratios by variant, target <= 3x (~5-15 min)",
    secagg_cost.NAME: "secure aggregation per round (mask, unmask, bytes) at 3/10/30 sites, 0/30% dropout, vs plain FedAvg and CKKS (~5-10 min)",
    secagg_fl.NAME: "FedAvg with vs without secure aggregation in FLARE simulation, 3 and 10 sites: round time ratio (target <= 1.10) and test AUC (~10-20 min)",
    dp_utility.NAME: "FedAvg test macro AUC with DP-SGD at epsilon 8 vs without DP (GroupNorm both), target ratio >= 0.90 (~20-40 min)",
    dti_fl.NAME: "DTI bundle, 12 scaffold-skewed sites: FL + secure aggregation vs central AUC (target >= 0.95), DP-SGD at epsilon 8, round time split (~20-40 min)",
}
REQUIRED_KEYS = ("name", "description", "command", "environment", "params", "rows", "summary")
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"


def build_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<18} {text}" for name, text in SUMMARIES.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=(
            "Run reproducible benchmarks of the chest X-ray bundle. Timings are reported as ratios of variants "
            "measured interleaved in the same process (medians over rounds), because the machines are shared and "
            "absolute times are noisy. Writes OUT/NAME.json and OUT/NAME.md per benchmark and regenerates "
            "docs/benchmarks.md from every result JSON in OUT."
        ),
        epilog=f"benchmarks:\n{listing}\n\nexamples:\n"
        "  python -m benchmarks.run data_pipeline central_training\n"
        "  python -m benchmarks.run central_auc --epochs 8\n"
        "  python -m benchmarks.run fl_vs_central --algorithms fedavg,scaffold --rounds 8\n"
        "  python -m benchmarks.run fl_overhead --quick --out /tmp/bench\n"
        "  python -m benchmarks.run all --quick --out /tmp/bench\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run, or 'all' ({', '.join(REGISTRY)})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="markdown page regenerated from OUT (default: docs/benchmarks.md)")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate the docs page")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: tiny cohorts, fewer repetitions (results marked quick)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before running (default: torch's own choice); fl_overhead: both variants' threads (default 1)")
    timing = parser.add_argument_group("timing benchmarks (data_pipeline, central_training, dp_step)")
    timing.add_argument("--repeats", type=int, help="timed rounds (default 3, fl_overhead 2, dp_step 5; quick: 2, fl_overhead 1, dp_step 3)")
    timing.add_argument("--sizes", type=int, nargs="+", help="central_training image sizes (default 64 224; quick: 64); dp_step (default 64 32; quick: 32)")
    timing.add_argument("--norms", nargs="+", choices=("batch", "group", "instance"), help="central_training norms (default batch group)")
    timing.add_argument("--strides", type=int, nargs="+", help="central_training stem strides (default 2 1)")
    timing.add_argument("--all-configs", action="store_true", help="central_training: also time 224 px with stem stride 1 (minutes per step on a small CPU)")
    timing.add_argument("--variants", help="dp_step: comma-separated variants to run (default all; 'non-private' is required)")
    timing.add_argument("--batch-size", type=int, help="central_training and dp_step batch size (default 32, the bundle's)")
    quality = parser.add_argument_group("data size / training (data_pipeline, central_auc)")
    quality.add_argument("--patients", type=int, help="synthetic patients (default 150 data_pipeline, 500 central_auc and fl_*; quick: 30 / 120 / 60)")
    quality.add_argument("--epochs", type=int, help="central_auc training epochs (default 8; quick: 1)")
    fl = parser.add_argument_group("federated (fl_vs_central, fl_overhead)")
    fl.add_argument("--rounds", type=int, help="federated rounds (default 8 fl_vs_central and dp_utility, 3 fl_overhead; quick: 2 / 1 / 1)")
    fl.add_argument("--local-epochs", type=int, help="local epochs per round (default 1 fl_vs_central, 2 fl_overhead; quick: 1)")
    fl.add_argument("--algorithms", help="fl_vs_central: comma-separated algorithms (default fedavg,fedprox,scaffold; quick: fedavg)")
    fl.add_argument("--image-size", type=int, help="synthetic image and spatial size in px (default 64; quick: 32)")
    fl.add_argument("--noise", type=float, nargs="+", help="dp_utility: extra fixed noise multipliers to sweep (default none: non-private and target epsilon 8 only)")
    fl.add_argument("--public-patients", type=int, help="dp_utility: public cohort for non-private pretraining before DP fine-tuning (default 1000; quick 120; 0: train from scratch)")
    fl.add_argument("--public-epochs", type=int, help="dp_utility: central pretraining epochs on the public cohort (default 4; quick 1)")
    fl.add_argument("--workdir", type=Path, help="keep the cohort and the runs' outputs under WORKDIR/NAME (default: a temporary folder)")
    return parser


def write_result(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write ``out/<name>.json`` (canonical) and ``out/<name>.md``."""
    from monai_fl_ext.io import atomic_write_json, atomic_write_text

    missing = [k for k in REQUIRED_KEYS if k not in result]
    if missing:
        raise ValueError(f"benchmark result {result.get('name')!r} lacks {missing}")
    json_path = atomic_write_json(out / f"{result['name']}.json", result)
    md_path = atomic_write_text(out / f"{result['name']}.md", result_markdown(result))
    return json_path, md_path


def write_docs(out: Path, docs: Path) -> Path:
    """Regenerate ``docs`` from every ``*.json`` result in ``out`` (registry order, then by name)."""
    from monai_fl_ext.io import atomic_write_text, read_json

    order = {name: i for i, name in enumerate(REGISTRY)}
    results = [read_json(p) for p in sorted(out.glob("*.json"))]
    results = [r for r in results if isinstance(r, dict) and all(k in r for k in REQUIRED_KEYS)]
    results.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    figure_dir = Path(os.path.relpath(out.resolve(), docs.resolve().parent)).as_posix()
    return atomic_write_text(docs, docs_markdown(results, figure_dir=figure_dir))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, text in SUMMARIES.items():
            print(f"{name:<18} {text}")
        return 0
    if not args.names:
        parser.error("name at least one benchmark, or 'all' (see --list)")
    names = list(REGISTRY) if "all" in args.names else list(dict.fromkeys(args.names))
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)} or 'all'")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    failed = []
    for name in names:
        print(f"[benchmarks] {name}: running{' (quick)' if args.quick else ''}...", flush=True)
        start = time.perf_counter()
        try:
            result = REGISTRY[name](args)
            json_path, md_path = write_result(result, args.out)
        except Exception:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"[benchmarks] {name}: done in {time.perf_counter() - start:.0f} s -> {json_path}, {md_path}", flush=True)
        for key, value in result["summary"].items():
            print(f"    {key}: {value}")
    if not args.no_docs:
        print(f"[benchmarks] docs -> {write_docs(args.out, args.docs)}")
    if failed:
        print(f"[benchmarks] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
