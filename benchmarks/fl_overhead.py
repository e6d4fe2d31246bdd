"""Orchestration overhead of FLARE: a one-site simulation vs the same local training without FLARE, side by side."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from benchmarks.common import BUNDLE, command, environment, fl_sizes, sig
from benchmarks.timing import interleaved, with_threads

NAME = "fl_overhead"
TARGET_RATIO = 1.15
DESCRIPTION = (
    "What NVIDIA FLARE adds to the wall time of federated training, with the learning work held fixed. "
    "The synthetic demo cohort (`SyntheticSpec(num_patients=--patients, image_size=--image-size, num_hospitals=3, "
    "seed=0)`) is given to ONE site (`write_partition(..., num_sites=1, strategy='iid', min_site_size=1)`), so "
    "nothing differs between the variants but the orchestration. **flare**: `run_simulation(FederatedJobSpec("
    "num_rounds=--rounds, local_epochs=--local-epochs, cross_site_eval=False, site_threads=T))` (simulator start, "
    "server thread, site process start-up and imports, model broadcast and upload, server-side aggregation, "
    "history, TensorBoard and checkpoints, final validation task). **plain**: the same site work in this process "
    "without FLARE: the initial global model from the bundle's `network_def`, `FederatedBundleAlgo(bundle, "
    "site overrides, local_epochs)` + `initialize` (workflow construction and cache fill, as the FLARE client "
    "does), then per round `evaluate` of the global weights, `train`, `get_weights` and FedAvg with one site "
    "(global += diff), and one final `evaluate`, then `finalize`; `torch.set_num_threads(T)`. Both are run "
    "--repeats times, interleaved with a rotating order (`benchmarks/timing.py`, no warm-up run; the FLARE and "
    "MONAI modules are imported before timing). `overhead_ratio` is the median over repeats of the flare/plain "
    f"ratio of two runs measured back to back (target <= {TARGET_RATIO}); `fixed_cost_s` is FLARE's added seconds "
    "(median of flare - plain); `round_overhead_s` compares a FLARE round after the first (server timer: task "
    "sent -> update aggregated) with a plain round (evaluate + train + get_weights + FedAvg)."
)


def _prepare(work: Path, patients: int, image_size: int) -> tuple[Path, Path, Path]:
    from monai_fl_ext.data.synthetic import SyntheticSpec
    from monai_fl_ext.demo import prepare_synthetic
    from monai_fl_ext.partition import write_partition

    spec = SyntheticSpec(num_patients=patients, image_size=image_size, num_hospitals=3, seed=0)
    dataset_dir, datalist, _ = prepare_synthetic(work / "cohort", spec, 3, 0.5, progress=False, min_site_size=1)
    one_site = write_partition(datalist, work / "partition_1site", num_sites=1, strategy="iid", alpha=0.5, seed=0, min_site_size=1)
    return dataset_dir, datalist, one_site


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``fl_overhead`` (see :data:`DESCRIPTION`)."""
    import nvflare.job_config.api  # noqa: F401  imported before timing: neither variant pays this process's imports
    from monai.fl.utils.constants import ExtraItems, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob  # noqa: F401

    from monai_fl_ext.algo import FederatedBundleAlgo
    from monai_fl_ext.bundle import resolve_bundle
    from monai_fl_ext.flare import controller  # noqa: F401
    from monai_fl_ext.flare.job import FederatedJobSpec, run_simulation
    from monai_fl_ext.flare.network import build_bundle_network
    from monai_fl_ext.io import read_json

    quick = bool(args.quick)
    patients, image_size, rounds, local_epochs = fl_sizes(args, quick_rounds=1, rounds=3, local_epochs=2)
    repeats = args.repeats or (1 if quick else 2)
    threads = args.threads or 1
    overrides = {"spatial_size": [image_size, image_size], "seed": 0}
    env = environment()
    env["torch_threads"] = threads  # both variants run at this count (site process / set_num_threads)

    tmp = None
    if args.workdir:
        work = Path(args.workdir).resolve() / NAME
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_fl_overhead_")
        work = Path(tmp.name)
    try:
        start = time.perf_counter()
        dataset_dir, _, partition_dir = _prepare(work, patients, image_size)
        prepare_seconds = time.perf_counter() - start
        site = read_json(partition_dir / "manifest.json")["sites"][0]["name"]
        counts = {split: len(items) for split, items in read_json(partition_dir / f"{site}.json").items()
                  if split in ("training", "validation", "test")}
        bundle_root = resolve_bundle(BUNDLE)
        calls = {"plain": 0, "flare": 0}
        flare_rounds: list[list[float]] = []
        plain_parts: list[dict[str, Any]] = []

        def plain() -> None:
            calls["plain"] += 1
            run_dir = work / f"plain_{calls['plain']}" / site
            site_overrides = {
                "dataset_dir": str(Path(dataset_dir).resolve()),
                "datalist": str((partition_dir / f"{site}.json").resolve()),
                "ckpt_dir": str(run_dir / "models"),
                "output_dir": str(run_dir / "eval"),
                **overrides,
            }
            t0 = time.perf_counter()
            global_weights = {k: v.detach().clone() for k, v in build_bundle_network(str(bundle_root), dict(overrides)).state_dict().items()}
            algo = FederatedBundleAlgo(bundle_root, site_overrides, local_epochs=local_epochs)
            algo.initialize(extra={ExtraItems.CLIENT_NAME: site, ExtraItems.APP_ROOT: ""})
            parts: dict[str, Any] = {"init_s": time.perf_counter() - t0, "rounds_s": []}
            for _ in range(rounds):
                t0 = time.perf_counter()
                data = ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS)
                algo.evaluate(data)
                algo.train(data, extra={"meta": {}})
                update = algo.get_weights()
                algo.local_validation_metrics()
                diff = {k: v.cpu() for k, v in update.weights.items() if k in global_weights}
                global_weights = {k: (v + diff[k].to(v.dtype)) if k in diff else v for k, v in global_weights.items()}
                parts["rounds_s"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            algo.evaluate(ExchangeObject(weights=global_weights, weight_type=WeightType.WEIGHTS))
            algo.finalize()
            parts["final_s"] = time.perf_counter() - t0
            plain_parts.append(parts)

        def flare() -> None:
            calls["flare"] += 1
            out = work / f"flare_{calls['flare']}"
            spec = FederatedJobSpec(
                bundle=BUNDLE, dataset_dir=str(dataset_dir), partition_dir=str(partition_dir), output_dir=str(out),
                num_rounds=rounds, local_epochs=local_epochs, overrides=dict(overrides), cross_site_eval=False,
                site_threads=threads, name=NAME,
            )
            server = run_simulation(spec)
            history = read_json(server / "history.json")
            if history.get("status") != "completed" or len(history["rounds"]) != rounds:
                raise RuntimeError(f"FLARE run {out} did not complete: status {history.get('status')}, "
                                   f"{len(history.get('rounds', []))} of {rounds} rounds")
            flare_rounds.append([r["seconds"] for r in history["rounds"]])

        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        timings = interleaved({"plain": with_threads(plain, threads), "flare": flare}, repeats=repeats, warmup=0)
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    finally:
        if tmp is not None:
            tmp.cleanup()

    plain_s, flare_s = timings.median("plain"), timings.median("flare")
    ratio = timings.paired_ratio("flare", "plain")
    fixed = statistics.median(f - p for f, p in zip(timings.samples["flare"], timings.samples["plain"]))
    epochs = rounds * local_epochs
    rows = [
        {"variant": name, "runs": len(s), "median_s": sig(timings.median(name), 4), "samples_s": [sig(x, 4) for x in s],
         "spread": sig(timings.spread(name), 2), "s_per_epoch": sig(timings.median(name) / epochs, 4),
         "ratio_to_plain": sig(timings.paired_ratio(name, "plain"))}
        for name, s in timings.samples.items()
    ]
    round_table = [{"run": f"flare_{i + 1}", "total_s": sig(timings.samples["flare"][i], 4),
                    **{f"round_{r}_s": sig(x, 4) for r, x in enumerate(secs)},
                    "outside_rounds_s": sig(timings.samples["flare"][i] - sum(secs), 4)}
                   for i, secs in enumerate(flare_rounds)]
    round_table += [{"run": f"plain_{i + 1}", "total_s": sig(timings.samples["plain"][i], 4),
                     **{f"round_{r}_s": sig(x, 4) for r, x in enumerate(p["rounds_s"])},
                     "outside_rounds_s": sig(timings.samples["plain"][i] - sum(p["rounds_s"]), 4),
                     "init_s": sig(p["init_s"], 4), "final_eval_s": sig(p["final_s"], 4)}
                    for i, p in enumerate(plain_parts)]
    later_flare = [x for secs in flare_rounds for x in secs[1:]]
    later_plain = [x for p in plain_parts for x in p["rounds_s"][1:]]
    round_overhead = statistics.median(later_flare) - statistics.median(later_plain) if later_flare and later_plain else None
    round_overhead_min = min(later_flare) - min(later_plain) if later_flare and later_plain else None
    ratio_of_minima = min(timings.samples["flare"]) / min(timings.samples["plain"])
    summary = {
        "overhead_ratio": sig(ratio),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "plain_median_s": sig(plain_s, 4),
        "flare_median_s": sig(flare_s, 4),
        "fixed_cost_s": sig(fixed, 3),
        "overhead_ratio_of_minima": sig(ratio_of_minima),
        "round_overhead_s": sig(round_overhead, 3),
        "round_overhead_of_minima_s": sig(round_overhead_min, 3),
        "outside_rounds_s": sig(statistics.median(
            t - sum(secs) for t, secs in zip(timings.samples["flare"], flare_rounds)) - statistics.median(
            t - sum(p["rounds_s"]) for t, p in zip(timings.samples["plain"], plain_parts)), 3),
        "rounds": rounds,
        "local_epochs": local_epochs,
        "training_images_per_epoch": counts.get("training"),
    }
    notes = [
        "overhead_ratio = median over repeats of flare/plain measured back to back; both variants do the same "
        "learning work (same site data, seeds, rounds, epochs, validations, torch threads).",
        "fixed_cost_s = flare - plain (median of paired differences): simulator and site-process start-up (imports, "
        "FLARE's cell network), weight transfer and server-side work (aggregation, history, TensorBoard, best/final "
        "checkpoints). With more or longer rounds the ratio falls toward 1 + (per-round cost / round time).",
        "Round table: FLARE rounds are the server's timer (task sent -> update aggregated; round 0 also waits for the "
        "site process to start, import and build its workflows); plain rounds are evaluate + train + get_weights + "
        "FedAvg. outside_rounds_s is everything else of a run (FLARE: simulator start, final validation task, "
        "shut-down; plain: algo construction/initialisation and the final evaluation). Summary outside_rounds_s = "
        "median FLARE outside-rounds time - median plain outside-rounds time; round_overhead_s = median FLARE round "
        "after the first - median plain round after the first (null with one round).",
        "Other work on a shared machine only ever adds time, so the *_of_minima estimates (fastest FLARE run / "
        "fastest plain run; fastest FLARE round after the first - fastest plain round after the first) are the "
        "least load-contaminated; the medians follow the project's convention. With few repeats, compare both.",
        f"Load average 1 min: {sig(load_before, 3)} before, {sig(load_after, 3)} after timing "
        "(shared cores: absolute seconds are noisy).",
    ]
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, args, patients=patients, image_size=image_size, rounds=rounds,
                           local_epochs=local_epochs, repeats=repeats),
        "environment": env,
        "params": {
            "patients": patients,
            "image_size": image_size,
            "sites": 1,
            "partition": "iid, 1 site, min_site_size 1",
            "counts": counts,
            "rounds": rounds,
            "local_epochs": local_epochs,
            "repeats": repeats,
            "torch_threads": threads,
            "cross_site_eval": False,
            "order": "interleaved, rotating (plain, flare, flare, plain, ...)",
            "prepare_seconds": sig(prepare_seconds, 3),
            "quick": quick,
        },
        "rows": rows,
        "tables": {"Per-run breakdown: round times (s)": round_table},
        "summary": summary,
        "notes": notes,
        "samples": {k: [float(x) for x in v] for k, v in timings.samples.items()},
    }
