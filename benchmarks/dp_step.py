"""Cost of one DP-SGD (Opacus) train step of the bundle's ResNet-18 vs the same GroupNorm network's plain step."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from argparse import Namespace
from typing import Any

from benchmarks.common import REPO, command, environment, sig, training_parts
from benchmarks.timing import interleaved, with_threads

NAME = "dp_step"
TARGET_RATIO = 3.0
NOISE = 1.0
CLIP = 1.0
PHYSICAL = 8
DESCRIPTION = (
    "Time and peak memory of one DP-SGD training step of the bundle's ResNet-18 (`norm=group`, the network DP-SGD "
    "trains; batch `--batch-size`, default the bundle's 32) relative to the plain, non-private step of the same "
    "GroupNorm network, on CPU (target: DP/non-private time ratio <= "
    f"{TARGET_RATIO:g}). `network`, `loss` (BCE with logits, mean) and `optimizer` (Adam) are instantiated from "
    "`train.json` with `monai.bundle.ConfigParser` (`spatial_size`, `norm: group` overridden), like "
    "`central_training`; inputs are a fixed random batch. DP variants are built directly with Opacus the way "
    "`monai_fl_ext.privacy.dp_sgd.enable_dp_sgd` does: `GradSampleModule(network, loss_reduction='mean')` (hooks "
    "mode: per-sample gradients from forward/backward hooks on the original modules, the network called as is) and "
    f"`DPOptimizer(optimizer, noise_multiplier={NOISE:g}, max_grad_norm={CLIP:g}, expected_batch_size=batch)`: "
    "per-sample clipping, Gaussian noise, Adam step. Cheaper variants tried: the same on 1 torch thread, "
    "channels_last memory format, Opacus' functorch and expanded-weights (`ew`) per-sample gradient modes, ghost "
    "clipping (`GradSampleModuleFastGradientClipping`, per-sample norms without materialising per-sample "
    f"gradients), and physical batches of {PHYSICAL} accumulated into the same logical batch "
    "(`DPOptimizer.signal_skip_step`, what `BatchMemoryManager` does) to cut memory. All variants are stepped once "
    "per round, rounds interleaved (`benchmarks/timing.py`); `time_vs_nonprivate` is the median per-round ratio "
    "to the non-private step at the default thread count. Peak memory: each variant is built again in a fresh "
    "subprocess, the kernel's peak-RSS counter is reset (`/proc/self/clear_refs` = 5) right before two train steps, "
    "and `peak_step_mib` = peak RSS during the steps (VmHWM) minus RSS just before them: the step's extra memory "
    "(activations, gradients, per-sample gradients, optimizer state on first step)."
)

# variant name -> (mode, channels_last, physical batch or None, threads or None)
VARIANTS: dict[str, tuple[str, bool, int | None, int | None]] = {
    "non-private": ("nonprivate", False, None, None),
    "non-private@1thr": ("nonprivate", False, None, 1),
    "non-private channels_last": ("nonprivate", True, None, None),
    "dp hooks": ("hooks", False, None, None),
    "dp hooks@1thr": ("hooks", False, None, 1),
    "dp hooks channels_last": ("hooks", True, None, None),
    "dp functorch": ("functorch", False, None, None),
    "dp ew": ("ew", False, None, None),
    "dp ghost clipping": ("ghost", False, None, None),
    "dp ghost clipping + conv2d norm sampler": ("ghost_conv", False, None, None),
    "dp mixed ghost": ("mixed_ghost", False, None, None),
    "dp mixed ghost@1thr": ("mixed_ghost", False, None, 1),
    "dp mixed ghost channels_last": ("mixed_ghost", True, None, None),
    f"dp hooks physical {PHYSICAL}": ("hooks", False, PHYSICAL, None),
}


class _PerSampleBCE:
    """BCE with logits with a ``reduction`` attribute whose ``none`` is per *sample* (mean over labels), for ghost clipping."""

    def __init__(self) -> None:
        self.reduction = "mean"

    def __call__(self, logits, target):
        import torch.nn.functional as F

        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)
        return loss if self.reduction == "none" else (loss.mean() if self.reduction == "mean" else loss.sum())


def build_step(size: int, batch_size: int, mode: str, channels_last: bool = False, physical: int | None = None):
    """A closure doing one train step of the given variant on a fixed random batch (raises if Opacus refuses it)."""
    import torch

    network, loss_fn, optimizer, x, y = training_parts({"spatial_size": [size, size], "norm": "group"}, batch_size)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    if mode == "nonprivate":
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(network(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    from opacus.optimizers import DPOptimizer

    noise_gen = torch.Generator().manual_seed(1)
    if mode in ("ghost", "ghost_conv"):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from monai_fl_ext.privacy.ghost import ghost_clipping_module_class

        module_class = ghost_clipping_module_class() if mode == "ghost_conv" else GradSampleModuleFastGradientClipping
        model = module_class(network, batch_first=True, loss_reduction="mean", max_grad_norm=CLIP, use_ghost_clipping=True)
        dp_opt = DPOptimizerFastGradientClipping(optimizer, noise_multiplier=NOISE, max_grad_norm=CLIP,
                                                 expected_batch_size=batch_size, loss_reduction="mean", generator=noise_gen)
        criterion = DPLossFastGradientClipping(model, dp_opt, _PerSampleBCE(), loss_reduction="mean")

        def ghost_step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)

        ghost_step._keep = model  # noqa: SLF001  (the hooks live as long as the wrapper)
        return ghost_step

    optimizer_class = DPOptimizer
    if mode == "mixed_ghost":  # what enable_dp_sgd(..., grad_sample_mode="mixed_ghost") builds
        from monai_fl_ext.privacy.ghost import make_grad_sample_module, make_optimizer

        model = make_grad_sample_module(network, batch_first=True, loss_reduction="mean", strict=True)
        forward = network
        optimizer_class = make_optimizer
    elif mode == "ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights

        model = GradSampleModuleExpandedWeights(network, batch_first=True, loss_reduction="mean")
        forward = model  # expanded weights work only through the wrapper's forward
    else:
        from opacus import GradSampleModule

        model = GradSampleModule(network, batch_first=True, loss_reduction="mean", strict=True,
                                 force_functorch=(mode == "functorch"))
        forward = network  # hooks live on the original submodules: call the network as the trainer does
    dp_opt = optimizer_class(optimizer, noise_multiplier=NOISE, max_grad_norm=CLIP, expected_batch_size=batch_size,
                             loss_reduction="mean", generator=noise_gen)

    if physical is None or physical >= batch_size:
        def dp_step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            loss_fn(forward(x), y).backward()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)  # frees the per-sample gradients (as the trainer's next step would)
    else:
        chunks = list(zip(x.split(physical), y.split(physical)))

        def dp_step() -> None:  # BatchMemoryManager's pattern: clip + accumulate each physical batch, one noisy step
            dp_opt.zero_grad(set_to_none=True)
            for i, (xc, yc) in enumerate(chunks):
                loss_fn(forward(xc), yc).backward()
                dp_opt.signal_skip_step(do_skip=i < len(chunks) - 1)
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)

    dp_step._keep = model  # noqa: SLF001
    return dp_step


def _reference(spec: tuple[str, bool, int | None, int | None], available: Any) -> str | None:
    """The non-private variant timed like-for-like with ``spec``: same memory format, same thread count."""
    _, channels_last, _, threads = spec
    for name, (mode, cl, _, thr) in VARIANTS.items():
        if mode == "nonprivate" and cl == channels_last and thr == threads and name in available:
            return name
    return None


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The summary of ``rows`` (adds each row's ``time_vs_fastest_nonprivate`` and ``fair_time_ratio``).

    ``fair_time_ratio`` is the larger of the paired like-for-like ratio (``time_vs_nonprivate``) and the variant's
    median step time over the *fastest* non-private variant's at the same thread count: a DP variant never looks
    cheaper because its own non-private reference (e.g. channels_last) happened to be slow. Every ratio the
    summary quotes is a ``fair_time_ratio``.
    """
    for size in sizes:
        for r in rows:
            if r["spatial_size"] != size:
                continue
            fastest = min((o["ms_per_step"] for o in rows if o["spatial_size"] == size and o["mode"] == "nonprivate"
                           and o["torch_threads"] == r["torch_threads"] and o["ms_per_step"]), default=None)
            vs_fastest = sig(r["ms_per_step"] / fastest, 3) if r["ms_per_step"] and fastest else None
            r["time_vs_fastest_nonprivate"] = vs_fastest
            pair = [x for x in (r.get("time_vs_nonprivate"), vs_fastest) if x is not None]
            r["fair_time_ratio"] = max(pair) if pair else None
    summary: dict[str, Any] = {}
    for size in sizes:
        dp_rows = [r for r in rows if r["spatial_size"] == size and r["mode"] != "nonprivate" and r["fair_time_ratio"] is not None]
        hooks = next((r for r in dp_rows if r["variant"] == "dp hooks"), None)
        mixed = next((r for r in dp_rows if r["variant"] == "dp mixed ghost"), None)
        best = min(dp_rows, key=lambda r: r["fair_time_ratio"], default=None)
        least_mem = min((r for r in dp_rows if r.get("peak_step_mib") is not None), key=lambda r: r["peak_step_mib"], default=None)
        summary[f"{size}px dp_hooks_time_ratio"] = hooks["fair_time_ratio"] if hooks else None
        summary[f"{size}px dp_hooks_memory_ratio"] = hooks.get("memory_vs_nonprivate") if hooks else None
        summary[f"{size}px dp_mixed_ghost_time_ratio"] = mixed["fair_time_ratio"] if mixed else None
        summary[f"{size}px dp_mixed_ghost_memory_ratio"] = mixed.get("memory_vs_nonprivate") if mixed else None
        summary[f"{size}px best_dp_variant"] = best["variant"] if best else None
        summary[f"{size}px best_dp_time_ratio"] = best["fair_time_ratio"] if best else None
        summary[f"{size}px least_memory_dp_variant"] = (f"{least_mem['variant']} ({least_mem['peak_step_mib']} MiB)"
                                                        if least_mem else None)
    all_best = [summary[f"{s}px best_dp_time_ratio"] for s in sizes if summary[f"{s}px best_dp_time_ratio"] is not None]
    summary["target_ratio"] = TARGET_RATIO
    summary["meets_target"] = bool(all_best and max(all_best) <= TARGET_RATIO)
    hooks_all = [summary[f"{s}px dp_hooks_time_ratio"] for s in sizes if summary[f"{s}px dp_hooks_time_ratio"] is not None]
    summary["hooks_mode_meets_target"] = bool(hooks_all and max(hooks_all) <= TARGET_RATIO)
    mixed_all = [summary[f"{s}px dp_mixed_ghost_time_ratio"] for s in sizes]
    summary["mixed_ghost_meets_target"] = bool(mixed_all and None not in mixed_all and max(mixed_all) <= TARGET_RATIO)
    return summary


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_probe(config: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: build one variant, then peak RSS growth over two steps (MiB)."""
    import resource

    import torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    step = build_step(config["size"], config["batch_size"], config["mode"], config["channels_last"], config["physical"])
    gc.collect()
    method = "VmHWM reset"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        method, before = "ru_maxrss delta", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        step()
    peak = _status_kib("VmHWM") if method == "VmHWM reset" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_step_mib": (peak - before) / 1024, "rss_before_mib": before / 1024, "method": method}


def _measure_memory(size: int, batch_size: int, spec: tuple[str, bool, int | None, int | None]) -> dict[str, Any]:
    mode, channels_last, physical, threads = spec
    config = {"size": size, "batch_size": batch_size, "mode": mode, "channels_last": channels_last, "physical": physical,
              "threads": threads}
    code = ("import json, sys; from benchmarks.dp_step import memory_probe; "
            "print('@@' + json.dumps(memory_probe(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": tail[0][:300]}


def run(args: Namespace) -> dict[str, Any]:
    """Benchmark ``dp_step`` (see :data:`DESCRIPTION`)."""
    import torch

    quick = bool(args.quick)
    sizes = args.sizes or ([32] if quick else [64, 32])
    batch_size = args.batch_size or 32
    repeats = args.repeats or (3 if quick else 5)
    threads = torch.get_num_threads()
    env = environment()
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    memory_method = None
    chosen = [v.strip() for v in (getattr(args, "variants", None) or "").split(",") if v.strip()] or list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or "non-private" not in chosen:
        raise ValueError(f"--variants must include 'non-private' and name only {list(VARIANTS)}; got unknown {unknown}")
    variants = {k: v for k, v in VARIANTS.items() if k in chosen}
    for size in sizes:
        steps, errors = {}, {}
        for name, (mode, cl, physical, thr) in variants.items():
            if thr is not None and thr >= threads:
                continue  # same as the default-thread variant
            try:
                step = build_step(size, batch_size, mode, cl, physical)
                step()  # a variant Opacus refuses fails here, not in the timed loop
            except Exception as exc:  # noqa: BLE001 - report the refusal as a row note
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                continue
            steps[name] = with_threads(step, thr) if thr else step
        gc.collect()
        print(f"[dp_step] {size} px: timing {len(steps)} variants x {repeats} rounds", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        timings = interleaved(steps, repeats=repeats, warmup=1)
        print(f"[dp_step] {size} px: memory probes", file=sys.stderr, flush=True)
        memory: dict[tuple, dict[str, Any]] = {}
        for name, spec in variants.items():
            mode, cl, physical, thr = spec
            if thr is not None and thr >= threads:
                continue
            row: dict[str, Any] = {"spatial_size": size, "variant": name, "mode": mode, "channels_last": cl,
                                   "physical_batch": physical or batch_size, "torch_threads": thr or threads}
            ref = _reference(spec, steps)
            if name in steps:
                seconds = timings.median(name)
                row.update({
                    "ms_per_step": sig(1000 * seconds),
                    "compared_with": ref,
                    "time_vs_nonprivate": sig(timings.paired_ratio(name, ref), 3) if ref else None,
                    "spread": sig(timings.spread(name), 2),
                })
                mem = memory.get((mode, cl, physical)) if thr else None
                if mem is None:
                    mem = _measure_memory(size, batch_size, spec)
                    memory[(mode, cl, physical)] = mem
                if "error" in mem:
                    row["peak_step_mib"] = None
                    row["note"] = f"memory probe failed: {mem['error']}"
                else:
                    row["peak_step_mib"] = sig(mem["peak_step_mib"], 3)
                    memory_method = mem["method"]
            else:
                row.update({"ms_per_step": None, "time_vs_nonprivate": None, "spread": None, "peak_step_mib": None,
                            "note": f"skipped: {errors[name]}"})
                skipped[f"{size}px {name}"] = errors[name]
            rows.append(row)
        base_mem = next((r["peak_step_mib"] for r in rows if r["spatial_size"] == size and r["variant"] == "non-private"), None)
        for r in rows:
            if r["spatial_size"] == size:
                r["memory_vs_nonprivate"] = (sig(r["peak_step_mib"] / base_mem, 3)
                                             if r.get("peak_step_mib") is not None and base_mem else None)
    summary = summarize(rows, sizes)
    notes = [
        "time_vs_nonprivate: median over rounds of (variant step time / non-private step time in the same round), "
        "like for like: each DP variant is divided by the non-private step of the same GroupNorm network and batch "
        "with the same torch thread count and memory format (column compared_with; default "
        f"{threads} torch thread(s)). fair_time_ratio = max(time_vs_nonprivate, time_vs_fastest_nonprivate), the "
        "latter being the variant's median step time over the fastest non-private variant's at the same thread "
        "count; the summary quotes only fair_time_ratio, so no DP variant looks cheap because its own reference "
        "was slow.",
        "dp mixed ghost: enable_dp_sgd(..., grad_sample_mode='mixed_ghost') (monai_fl_ext.privacy.ghost): one "
        "backward pass; for every 2D convolution weight the per-sample gradient norms come from the unfolded "
        "activations and backprops, by the ghost form (T x T Gram matrices) or the direct per-sample gradient, "
        "whichever costs less for that layer's shape (Bu et al.'s mixed ghost clipping), and the clipped sum is "
        "one GEMM over the stored activations and backprops (book-keeping); other parameters (GroupNorm, fc, "
        "biases) keep Opacus' per-sample gradients. Same clipped sum as hooks mode (tests/test_dp_sgd.py).",
        "dp ghost clipping + conv2d norm sampler: Opacus' two-pass ghost clipping with "
        "monai_fl_ext.privacy.ghost.conv2d_norm_sample registered for Conv2d (a subclass, Opacus' registry "
        "untouched), so convolutions no longer fall back to per-sample gradients.",
        "meets_target: the best DP variant's ratio is <= the target at every size; hooks_mode_meets_target: the same "
        "for the plain hooks mode (enable_dp_sgd's default); mixed_ghost_meets_target: the same for "
        "grad_sample_mode='mixed_ghost'.",
        f"Peak memory method: {memory_method or 'n/a'} in a fresh subprocess per variant (default threads); "
        "the @1thr variants reuse their default-thread variant's number (same tensors). "
        "peak_step_mib is the step's extra resident memory, first (optimizer-state-allocating) step included; "
        "it is per process, so variants do not disturb one another. Hooks mode materialises one gradient per "
        "sample for every parameter (~11M params x batch x 4 B), the main memory cost; physical batches cap it.",
        f"'dp hooks physical {PHYSICAL}': the logical batch of {batch_size} in physical batches of {PHYSICAL}; each "
        "is clipped and accumulated (DPOptimizer.signal_skip_step, as opacus.utils.batch_memory_manager does), one "
        "noisy Adam step per logical batch: the same DP-SGD step, less memory.",
        "dp ghost clipping: per-sample gradient norms without per-sample gradients (two backward passes); it needs "
        "a per-sample loss vector, here the BCE averaged over the 14 labels per image (what hooks mode clips too). "
        "monai_fl_ext does not use it (it needs a second backward pass and a per-sample loss inside the MONAI "
        "trainer's iteration).",
        "Ratios, not absolute times, are the result: the machine is shared and was also running other jobs.",
    ]
    if len(chosen) < len(VARIANTS):
        notes.append("Not run (left out with --variants): " + ", ".join(v for v in VARIANTS if v not in chosen) + ".")
    if skipped:
        notes.append("Variants that did not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return {
        "name": NAME,
        "description": DESCRIPTION,
        "command": command(NAME, args, sizes=sizes, batch_size=batch_size, repeats=repeats,
                           variants=",".join(chosen) if len(chosen) < len(VARIANTS) else None),
        "environment": env,
        "params": {
            "batch_size": batch_size,
            "sizes": sizes,
            "repeats": repeats,
            "warmup_steps": 1,
            "noise_multiplier": NOISE,
            "max_grad_norm": CLIP,
            "physical_batch": PHYSICAL,
            "variants": chosen,
            "norm": "group",
            "torch_threads": threads,
            "device": "cpu",
            "quick": quick,
        },
        "rows": rows,
        "summary": summary,
        "notes": notes,
    }
