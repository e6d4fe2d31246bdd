"""Training throughput of the bundle's ResNet-18 train step across image size, norm and stem stride."""

from __future__ import annotations

import itertools
from argparse import Namespace
from typing import Any

from benchmarks.common import command, environment, sig, training_parts
from benchmarks.timing import interleaved, with_threads

NAME = "central_training"
DESCRIPTION = (
    "Throughput of one training step of the bundle's ResNet-18 (forward, BCE loss, backward, Adam step; "
    "batch `--batch-size`, default the bundle's 32) on CPU. `network`, `loss` and `optimizer` are "
    "instantiated from `train.json` with `monai.bundle.ConfigParser`, overriding `spatial_size`, `norm` "
    "(`batch` for plain training, `group` for DP-SGD) and `stem_stride` (2 = default, 1 = keep full "
    "resolution after the stem). Inputs are a fixed random batch (`torch.manual_seed(0)`), so only compute "
    "is timed. Every configuration is stepped once per round, rounds interleaved; "
    "`time_vs_baseline` is the median per-round ratio of its step time to the 64 px / batch / stride-2 "
    "baseline's (2.0 = twice as slow per image). `gflop_fwd` is the forward FLOPs per image counted from "
    "conv and linear layers, `flop_ratio` the same relative to the baseline: a machine-independent "
    "expectation for `time_vs_baseline`."
)
BASELINE = (64, "batch", 2)


def _key(size: int, norm: str, stride: int) -> str:
    return f"{size}px/{norm}/stride{stride}"


def forward_gflops(network, size: int) -> float:
    """Forward GFLOPs (2 x multiply-adds) of conv and linear layers for one 1-channel ``size``² image."""
    import torch
    from torch import nn

    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = network.training
    network.eval()
    with torch.no_grad():
        network(torch.zeros(1, 1, size, size))
    network.train(was_training)
    for h in handles:
        h.remove()
    return 2 * macs / 1e9


def _train_step(size: int, norm: str, stride: int, batch_size: int):
    """A closure doing one train step of the bundle's network/loss/optimizer, and the network."""

    network, loss_fn, optimizer, x, y = training_parts({"spatial_size": [size, size], "norm": norm, "stem_stride": stride}, batch_size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(network(x), y).backward()
        optimizer.step()

    return step, network


def _expensive(size: int, stride: int) -> bool:
    """Configs left untimed (FLOPs only) unless ``--all-configs``: full-resolution stems at 224 px."""
    return size >= 224 and stride == 1


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``central_training`` (see :data:`DESCRIPTION`)."""
    import torch

    sizes = args.sizes or ([64] if args.quick else [64, 224])
    norms = args.norms or ["batch", "group"]
    strides = args.strides or [2, 1]
    batch_size = args.batch_size or 32
    repeats = args.repeats or (2 if args.quick else 3)
    all_configs = bool(getattr(args, "all_configs", False))
    threads = torch.get_num_threads()
    env = environment()
    grid = [BASELINE] + [c for c in itertools.product(sizes, norms, strides) if c != BASELINE]
    timed = [c for c in grid if all_configs or not _expensive(c[0], c[2])]
    steps, flops, warmup = {}, {}, {}
    for size, norm, stride in grid:
        step, network = _train_step(size, norm, stride, batch_size)
        key = _key(size, norm, stride)
        flops[key] = forward_gflops(network, size)
        if (size, norm, stride) in timed:
            steps[key] = step
            warmup[key] = 1 if args.quick or size > 64 else 2
    base = _key(*BASELINE)
    single = f"{base}@1thr"
    if threads > 1:  # the baseline again on one thread: do the extra threads help on this machine now?
        steps[single] = with_threads(_train_step(*BASELINE, batch_size)[0], 1)
        warmup[single] = warmup[base]
    torch.manual_seed(0)
    timings = interleaved(steps, repeats=repeats, warmup=warmup)
    rows = []
    for size, norm, stride in grid:
        key = _key(size, norm, stride)
        row: dict[str, Any] = {"spatial_size": size, "norm": norm, "stem_stride": stride, "torch_threads": threads}
        if key in steps:
            seconds = timings.median(key)
            row.update(
                {
                    "ms_per_image": sig(1000 * seconds / batch_size),
                    "images_per_s": sig(batch_size / seconds),
                    "time_vs_baseline": sig(timings.paired_ratio(key, base), 3),
                }
            )
        else:
            row.update({"ms_per_image": None, "images_per_s": None, "time_vs_baseline": None})
        row.update(
            {
                "gflop_fwd": sig(flops[key], 3),
                "flop_ratio": sig(flops[key] / flops[base], 3),
                "spread": sig(timings.spread(key), 2) if key in steps else None,
            }
        )
        rows.append(row)
    if single in steps:
        seconds = timings.median(single)
        rows.insert(
            1,
            {
                **rows[0],
                "torch_threads": 1,
                "ms_per_image": sig(1000 * seconds / batch_size),
                "images_per_s": sig(batch_size / seconds),
                "time_vs_baseline": sig(timings.paired_ratio(single, base), 3),
                "spread": sig(timings.spread(single), 2),
            },
        )
    summary: dict[str, Any] = {
        "baseline": f"{base} ({threads} torch threads)",
        "baseline_ms_per_image": rows[0]["ms_per_image"],
        "baseline_images_per_s": rows[0]["images_per_s"],
    }
    summary.update({f"time_vs_baseline[{_key(*c)}]": r["time_vs_baseline"] for c, r in zip(grid, rows[1:] if single in steps else rows) if c != BASELINE and c in timed})
    if single in steps:
        summary["baseline_on_1_thread_vs_baseline"] = rows[1]["time_vs_baseline"]
    notes = [
        "time_vs_baseline: how many times longer a step takes per image than the baseline's, median of per-round ratios.",
        "Absolute ms/image depend on the machine and its load at the time; the ratios are the result.",
        "spread = (max - min) / median of the per-step times: the run's noise level on this shared machine.",
    ]
    untimed = [_key(*c) for c in grid if c not in timed]
    if untimed:
        notes.append(
            f"Not timed (one batch-{batch_size} step takes about a minute on a 2-core CPU; add --all-configs): "
            + ", ".join(untimed) + ". Their flop_ratio is the expected time_vs_baseline."
        )
    if single in steps:
        notes.append(
            "The baseline is also timed with torch.set_num_threads(1): baseline_on_1_thread_vs_baseline < 1 means "
            f"the default {threads} threads were slower than one on this machine at the time (busy cores)."
        )
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(
            NAME, args, sizes=sizes, norms=norms, strides=strides, batch_size=batch_size, repeats=repeats, all_configs=all_configs
        ),
        "environment": env,
        "params": {
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup_steps": dict(warmup),
            "sizes": sizes,
            "norms": norms,
            "strides": strides,
            "all_configs": all_configs,
            "torch_threads": threads,
            "device": "cpu",
            "quick": bool(args.quick),
        },
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
