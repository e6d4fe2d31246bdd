"""Mixed ghost clipping for convolutions, book-keeping style: DP-SGD without per-sample conv gradients.

Opacus' hooks mode materialises one gradient per sample for every parameter (batch x 11 M floats for
ResNet-18) and its ghost clipping (``grad_sample_mode="ghost"``) has norm samplers for ``Linear`` and
``Embedding`` only, so convolutions still fall back to full per-sample gradients, and it needs a second
backward pass and a per-sample loss vector. This module computes what DP-SGD needs from a 2D convolution
with one backward pass and no per-sample weight gradients:

For sample ``i`` let ``A_i`` (``D x T``: ``D = C_in * k_h * k_w`` unfolded input patches at ``T`` output
positions) be its unfolded activations and ``B_i`` (``p x T``, ``p = C_out``) the gradient of the loss
w.r.t. the layer's output (Opacus' backprops, scaled by the batch size for a mean loss). The per-sample
weight gradient is ``G_i = B_i A_i^T`` and

- **ghost norm** (Goodfellow 2015; Li et al. 2022; Bu et al. 2022, "mixed ghost clipping"):
  ``||G_i||_F^2 = <A_i^T A_i, B_i^T B_i>`` (two ``T x T`` Gram matrices), cost ``~T^2 (D + p)`` per sample;
- **direct norm**: form ``G_i`` (``p x D``) and take its norm, cost ``~T D p`` per sample.

Each layer takes the cheaper of the two (decided from its shapes, so early high-resolution layers go
direct and late low-resolution layers go ghost), as in Bu et al.'s mixed ghost clipping. The clipped sum
``sum_i c_i G_i`` (``c_i = min(1, C / ||g_i||)`` from the norms over *all* parameters) is then one GEMM
over the stored ``A`` and ``B`` (ghost layers) or an einsum over the stored ``G_i`` (direct layers), the
"book-keeping" trick of Bu et al. 2023: no second backward pass, and the trainer's loss stays the bundle's
mean loss. Every other layer (GroupNorm, Linear, biases, grouped or non-zero-padded convolutions) keeps
Opacus' own per-sample gradients, which are small. The result is the same clipped sum Opacus' hooks mode
computes (``tests/test_dp_sgd.py`` checks norms and clipped gradients against it); noise, scaling and the
optimizer step are ``DPOptimizer``'s.

Use :func:`monai_fl_ext.privacy.enable_dp_sgd` with ``grad_sample_mode="mixed_ghost"``;
:func:`conv2d_norm_sample` is also an Opacus norm sampler (:func:`ghost_clipping_module_class` plugs it into
Opacus' own two-pass ghost clipping).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MixedGhostDPOptimizer",
    "MixedGhostGradSampleModule",
    "conv2d_norm_sample",
    "ghost_is_cheaper",
    "ghost_clipping_module_class",
    "make_grad_sample_module",
    "make_optimizer",
]


def _supported(module: nn.Module) -> bool:
    """A 2D convolution this module handles (plain zero padding given as numbers, one group)."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def ghost_is_cheaper(positions: int, fan_in: int, out_channels: int) -> bool:
    """Whether the ghost norm (``T^2 (D + p)`` per sample) costs less than forming ``G_i`` (``T D p``)."""
    return positions * (fan_in + out_channels) < fan_in * out_channels


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches, ``(n, C_in * k_h * k_w, T)``."""
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


class _ConvWeightRecord:
    """What one conv weight keeps between backward and the optimizer step: its per-sample squared norms
    and either the per-sample gradients (direct layers) or the unfolded activations and backprops (ghost)."""

    __slots__ = ("norm_sq", "grads", "a", "b", "shape")

    def __init__(self, module: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor, mode: str = "auto") -> None:
        n = x.shape[0]
        a = _unfold(module, x.to(backprops.dtype))  # (n, D, T)
        b = backprops.reshape(n, backprops.shape[1], -1)  # (n, p, T)
        positions, fan_in, out_channels = a.shape[2], a.shape[1], b.shape[1]
        ghost = ghost_is_cheaper(positions, fan_in, out_channels) if mode == "auto" else mode == "ghost"
        self.shape = module.weight.shape
        if ghost:
            aat = torch.bmm(a.transpose(1, 2), a)  # (n, T, T)
            bbt = torch.bmm(b.transpose(1, 2), b)
            self.norm_sq = (aat * bbt).sum(dim=(1, 2)).clamp(min=0)
            self.a, self.b, self.grads = a, b, None
        else:
            grads = torch.bmm(b, a.transpose(1, 2))  # (n, p, D)
            self.norm_sq = grads.pow(2).sum(dim=(1, 2))
            self.a = self.b = None
            self.grads = grads

    def clipped_sum(self, clip_factor: torch.Tensor) -> torch.Tensor:
        """``sum_i c_i G_i`` in the weight's shape."""
        c = clip_factor.to(self.norm_sq.dtype)
        if self.grads is not None:
            out = torch.einsum("i,ipd->pd", c, self.grads)
        else:
            n, p, t = self.b.shape
            bc = (self.b * c.view(n, 1, 1)).transpose(0, 1).reshape(p, n * t)  # (p, n T)
            out = bc @ self.a.transpose(1, 2).reshape(n * t, -1)  # (n T, D)
        return out.reshape(self.shape)


def conv2d_norm_sample(module: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor,
                       mode: str = "auto") -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient norms of a ``Conv2d``'s parameters without per-sample gradients (Opacus norm-sampler API).

    Args:
        module: the convolution (one group, zero padding).
        activations: ``[input]`` as Opacus' forward hook records it.
        backprops: gradient w.r.t. the output, ``(n, C_out, H_out, W_out)`` (already scaled by Opacus).
        mode: ``"auto"`` (cheaper of ghost and direct), ``"ghost"`` or ``"direct"``.

    Returns:
        ``{weight: (n,) norms, bias: (n,) norms}`` (bias only if the layer has a trainable one).
    """
    if not _supported(module):
        raise NotImplementedError(f"conv2d_norm_sample supports ungrouped, zero-padded Conv2d only, got {module}")
    out: dict[nn.Parameter, torch.Tensor] = {}
    if module.weight.requires_grad:
        out[module.weight] = _ConvWeightRecord(module, activations[0], backprops, mode).norm_sq.sqrt()
    if module.bias is not None and module.bias.requires_grad:
        out[module.bias] = backprops.sum(dim=(2, 3)).norm(2, dim=1)
    return out


def ghost_clipping_module_class():
    """Opacus' ``GradSampleModuleFastGradientClipping`` with :func:`conv2d_norm_sample` as the ``nn.Conv2d`` norm
    sampler, as a subclass (Opacus' own registry, a class attribute, is left alone). Opacus' two-pass ghost
    clipping then skips per-sample gradients for convolutions too. Only ungrouped zero-padded ``Conv2d``."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    class GhostClippingWithConv2d(GradSampleModuleFastGradientClipping):
        NORM_SAMPLERS = {**GradSampleModuleFastGradientClipping.NORM_SAMPLERS, nn.Conv2d: conv2d_norm_sample}

    return GhostClippingWithConv2d


class MixedGhostGradSampleModule:
    """Opacus' ``GradSampleModule`` (hooks on the original modules) where supported ``Conv2d`` weights keep a
    :class:`_ConvWeightRecord` in ``p._ghost`` instead of a per-sample gradient ``p.grad_sample``.

    Built by :func:`make_grad_sample_module` (the class is created lazily so importing this module does not
    import Opacus). Pair it with :class:`MixedGhostDPOptimizer`.
    """


def make_grad_sample_module(network: nn.Module, mode: str = "auto", **kwargs: Any):
    """``GradSampleModule(network, **kwargs)`` with mixed ghost book-keeping for supported ``Conv2d`` weights."""
    from opacus import GradSampleModule

    class _MixedGhost(GradSampleModule, MixedGhostGradSampleModule):
        def capture_backprops_hook(self, module, _forward_input, forward_output, loss_reduction, batch_first):
            if not self.hooks_enabled:
                return
            if not (_supported(module) and module.weight.requires_grad):
                return super().capture_backprops_hook(module, _forward_input, forward_output, loss_reduction, batch_first)
            backprops = forward_output[0].detach()
            activations, backprops = self.rearrange_grad_samples(
                module=module, backprops=backprops, loss_reduction=loss_reduction, batch_first=batch_first)
            weight = module.weight
            if getattr(weight, "_ghost", None) is not None:
                raise ValueError("mixed ghost clipping needs one forward/backward per optimizer step (no gradient "
                                 "accumulation, no parameter reuse within a forward pass)")
            weight._ghost = _ConvWeightRecord(module, activations[0], backprops, mode)
            weight._forward_counter -= 1
            if module.bias is not None and module.bias.requires_grad:
                from opacus.grad_sample.grad_sample_module import create_or_accumulate_grad_sample, promote_current_grad_sample

                create_or_accumulate_grad_sample(param=module.bias, grad_sample=backprops.sum(dim=(2, 3)),
                                                 max_batch_len=module.max_batch_len)
                module.bias._forward_counter -= 1
                if module.bias._forward_counter == 0:
                    promote_current_grad_sample(module.bias)
            if len(module.activations) == 0 and hasattr(module, "max_batch_len"):
                del module.max_batch_len

    return _MixedGhost(network, **kwargs)


def _optimizer_class():
    from opacus.optimizers import DPOptimizer

    class _Optimizer(DPOptimizer, MixedGhostDPOptimizer):
        """``DPOptimizer`` whose clipping reads conv weights' ghost records as well as ``p.grad_sample``."""

        @property
        def accumulated_iterations(self) -> int:
            return 1  # one forward/backward per step (enforced by the module's hooks)

        def _has_per_sample(self, p) -> bool:
            return getattr(p, "_ghost", None) is not None or getattr(p, "grad_sample", None) is not None

        def clip_and_accumulate(self) -> None:
            params = self.params
            norm_sq = None
            batch = None
            for p in params:
                if getattr(p, "_ghost", None) is not None:
                    contrib = p._ghost.norm_sq
                elif getattr(p, "grad_sample", None) is not None:
                    g = self._get_flat_grad_sample(p)
                    contrib = g.reshape(len(g), -1).pow(2).sum(dim=1) if len(g) else g.new_zeros(0)
                else:
                    raise ValueError("Per sample gradient not found. Are you using the mixed ghost GradSampleModule?")
                if batch is None:
                    batch = len(contrib)
                elif len(contrib) != batch:
                    raise ValueError(f"per-sample batch sizes differ across parameters ({len(contrib)} vs {batch})")
                contrib = contrib.to(torch.float64)
                norm_sq = contrib if norm_sq is None else norm_sq + contrib.to(norm_sq.device)
            if norm_sq is None:
                return
            self.per_sample_norms = norm_sq.sqrt()
            clip = (self.max_grad_norm / (self.per_sample_norms + 1e-6)).clamp(max=1.0)
            for p in params:
                c = clip.to(device=p.device, dtype=p.dtype)
                record = getattr(p, "_ghost", None)
                if record is not None:
                    grad = record.clipped_sum(c).to(p.dtype)
                    p._ghost = None  # free activations / per-sample gradients now
                else:
                    gs = self._get_flat_grad_sample(p).to(p.dtype)
                    grad = torch.einsum("i,i...", c, gs)
                    p.grad_sample = None
                p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad

        def pre_step(self, closure=None):
            if not any(self._has_per_sample(p) for p in self.params):
                return True
            self.clip_and_accumulate()
            if self._check_skip_next_step():
                self._is_last_step_skipped = True
                return False
            self.add_noise()
            self.scale_grad()
            if self.step_hook:
                self.step_hook(self)
            self._is_last_step_skipped = False
            return True

        def zero_grad(self, set_to_none: bool = False):
            for p in self.params:
                p._ghost = None
            super().zero_grad(set_to_none)

    return _Optimizer


class MixedGhostDPOptimizer:
    """Marker base of the optimizer :func:`make_optimizer` builds (a ``DPOptimizer`` subclass)."""


def make_optimizer(optimizer: torch.optim.Optimizer, **kwargs: Any):
    """``DPOptimizer(optimizer, **kwargs)`` that clips with the records of :func:`make_grad_sample_module`."""
    return _optimizer_class()(optimizer, **kwargs)
