"""Training throughput of the bundle's ResNet-18 train step across image size, norm and stem stride."""

from __future__ import annotations

import itertools
from argparse import Namespace
from typing import Any

from benchmarks.common import bundle_parser, command, environment, sig
from benchmarks.timing import interleaved

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
    import torch

    parser = bundle_parser({"spatial_size": [size, size], "norm": norm, "stem_stride": stride})
    torch.manual_seed(0)
    network = parser.get_parsed_content("network").train()
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    classes = parser.get_parsed_content("num_classes")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, size, size, generator=g)
    y = (torch.rand(batch_size, classes, generator=g) < 0.1).float()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(network(x), y)
        loss.backward()
        optimizer.step()
        return float(loss)

    return step, network


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``central_training`` (see :data:`DESCRIPTION`)."""
    import torch

    sizes = args.sizes or ([64] if args.quick else [64, 224])
    norms = args.norms or ["batch", "group"]
    strides = args.strides or [2, 1]
    batch_size = args.batch_size or 32
    repeats = args.repeats or (2 if args.quick else 3)
    warmup = 1 if args.quick else 2
    env = environment()
    configs = [BASELINE] + [c for c in itertools.product(sizes, norms, strides) if c != BASELINE]
    steps, flops = {}, {}
    for size, norm, stride in configs:
        step, network = _train_step(size, norm, stride, batch_size)
        steps[_key(size, norm, stride)] = step
        flops[_key(size, norm, stride)] = forward_gflops(network, size)
    torch.manual_seed(0)
    timings = interleaved(steps, repeats=repeats, warmup=warmup)
    base = _key(*BASELINE)
    rows = []
    for size, norm, stride in configs:
        key = _key(size, norm, stride)
        seconds = timings.median(key)
        rows.append(
            {
                "spatial_size": size,
                "norm": norm,
                "stem_stride": stride,
                "ms_per_image": sig(1000 * seconds / batch_size),
                "images_per_s": sig(batch_size / seconds),
                "time_vs_baseline": sig(timings.paired_ratio(key, base), 3),
                "gflop_fwd": sig(flops[key], 3),
                "flop_ratio": sig(flops[key] / flops[base], 3),
                "spread": sig(timings.spread(key), 2),
            }
        )
    summary: dict[str, Any] = {
        "baseline": base,
        "baseline_ms_per_image": rows[0]["ms_per_image"],
        "baseline_images_per_s": rows[0]["images_per_s"],
    }
    summary.update({f"time_vs_baseline[{_key(*c)}]": r["time_vs_baseline"] for c, r in zip(configs, rows) if c != BASELINE})
    notes = [
        "Absolute ms/image depend on the machine and its load at the time; the ratios are the result.",
        "spread = (max - min) / median of the per-step times: the run's noise level on this shared machine.",
    ]
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(
            NAME,
            Namespace(quick=args.quick, sizes=sizes, norms=norms, strides=strides, batch_size=batch_size, repeats=repeats),
            ("sizes", "norms", "strides", "batch_size", "repeats"),
        ),
        "environment": env,
        "params": {
            "batch_size": batch_size,
            "repeats": repeats,
            "warmup": warmup,
            "sizes": sizes,
            "norms": norms,
            "strides": strides,
            "device": "cpu",
            "quick": bool(args.quick),
        },
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
