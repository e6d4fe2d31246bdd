"""A DP-safe ResNet-18 built from MONAI's ResNet, with the normalisation chosen by config.

MONAI 1.6.1's ``resnet18(norm=...)`` applies ``norm`` only to the stem: its residual blocks stay
BatchNorm with ``ReLU(inplace=True)`` and add the shortcut in place (``out += residual``). Opacus
rejects BatchNorm (it mixes samples) and in-place ops on hooked outputs. This module keeps MONAI's
layer names, so checkpoints load into stock MONAI code, but threads the chosen norm through every
block and removes every in-place op.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.networks.layers.factories import Conv
from monai.networks.nets.resnet import ResNet, ResNetBlock
from torch import nn

NORMS = ("batch", "group", "instance")


def norm_spec(norm: str, channels: int, num_groups: int = 32) -> str | tuple:
    """MONAI norm spec for ``channels`` channels.

    ``"group"`` uses ``gcd(num_groups, channels)`` groups; the default 32 is the replacement Opacus'
    ``ModuleValidator.fix`` makes, so a BatchNorm model fixed by Opacus and this model have the same structure.

    Raises:
        ValueError: ``norm`` is not one of :data:`NORMS`.
    """
    if norm == "batch":
        return "batch"
    if norm == "group":
        return ("group", {"num_groups": math.gcd(int(num_groups), channels)})
    if norm == "instance":
        return ("instance", {"affine": True})
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class SafeResNetBlock(ResNetBlock):
    """MONAI's basic residual block without in-place operations."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        spatial_dims: int = 3,
        stride: int = 1,
        downsample: nn.Module | Callable | None = None,
        act: str | tuple = ("relu", {"inplace": False}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__(in_planes, planes, spatial_dims, stride, downsample, act, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + residual)


class SafeResNet(ResNet):
    """MONAI ``ResNet`` with basic blocks whose normalisation is ``norm`` everywhere and no in-place ops.

    Args:
        layers: blocks per stage, ``[2, 2, 2, 2]`` for ResNet-18.
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        num_classes: output logits.
        norm: ``"batch"`` for plain training, ``"group"`` for DP-SGD (Opacus), or ``"instance"``.
        conv1_t_stride: stem stride; 2 matches torchvision and is 4x cheaper on small images.
        conv1_t_size: stem kernel size.
        no_max_pool: skip the stem's max pooling.
        width: channel multiplier of every stage (MONAI's ``widen_factor``): stages have
            ``int(width * [64, 128, 256, 512])`` channels; 1.0 is the standard ResNet-18 (11.2 M parameters),
            0.25 keeps its 18-layer depth with about 1/16 of the parameters (for DP-SGD, whose noise grows
            with the number of parameters).
        num_groups: GroupNorm groups (``gcd(num_groups, channels)`` per layer) when ``norm="group"``.
    """

    def __init__(
        self,
        layers: list[int],
        spatial_dims: int = 2,
        in_channels: int = 1,
        num_classes: int = 14,
        norm: str = "batch",
        conv1_t_stride: int = 2,
        conv1_t_size: int = 7,
        no_max_pool: bool = False,
        width: float = 1.0,
        num_groups: int = 32,
    ) -> None:
        if not width > 0 or int(64 * width) < 1:
            raise ValueError(f"width must be > 0 and leave at least one channel in the stem, got {width}")
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self._norm = norm
        self._num_groups = int(num_groups)
        stem = int(64 * width)
        norm_spec(norm, stem)  # validate before building anything
        super().__init__(
            block=SafeResNetBlock,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=spatial_dims,
            n_input_channels=in_channels,
            conv1_t_size=conv1_t_size,
            conv1_t_stride=conv1_t_stride,
            no_max_pool=no_max_pool,
            num_classes=num_classes,
            widen_factor=width,
            act=("relu", {"inplace": False}),
            norm=norm_spec(norm, stem, self._num_groups),
        )
        for m in self.modules():  # MONAI initialises only the stem's norm type
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self,
        block: type[ResNetBlock],
        planes: int,
        blocks: int,
        spatial_dims: int,
        shortcut_type: str,
        stride: int = 1,
        norm: str | tuple = "batch",
    ) -> nn.Sequential:
        # MONAI's _make_layer ignores the network's norm (it always uses its "batch" default).
        out_planes = planes * block.expansion
        spec = norm_spec(self._norm, out_planes, self._num_groups)
        downsample = None
        if stride != 1 or self.in_planes != out_planes:
            from monai.networks.layers.utils import get_norm_layer

            conv = Conv[Conv.CONV, spatial_dims]
            downsample = nn.Sequential(
                conv(self.in_planes, out_planes, kernel_size=1, stride=stride, bias=self.bias_downsample),
                get_norm_layer(name=spec, spatial_dims=spatial_dims, channels=out_planes),
            )
        layers = [block(self.in_planes, planes, spatial_dims=spatial_dims, stride=stride, downsample=downsample, norm=spec)]
        self.in_planes = out_planes
        layers += [block(self.in_planes, planes, spatial_dims=spatial_dims, norm=spec) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def resnet18(
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 14,
    norm: str = "batch",
    conv1_t_stride: int = 2,
    no_max_pool: bool = False,
    width: float = 1.0,
    num_groups: int = 32,
) -> SafeResNet:
    """ResNet-18 (four stages of two basic blocks) built by :class:`SafeResNet`; see its Args."""
    return SafeResNet(
        [2, 2, 2, 2],
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        conv1_t_stride=conv1_t_stride,
        no_max_pool=no_max_pool,
        width=width,
        num_groups=num_groups,
    )
