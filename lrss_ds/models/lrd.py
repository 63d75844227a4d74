"""The EHSNet long-range dependency (LRD) module: parallel large-kernel convolutions."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from lrss_ds.models.large_kernel import DepthwiseConv2d

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``relu``, ``gelu`` or ``silu``).

    Raises:
        ValueError: unknown name.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, activation: str | None) -> nn.Sequential:
    """``Conv(K x K, 'same', no bias) -> BN [-> activation]``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class LRDUnit(nn.Module):
    """The LRDU: a dense 5x5 conv and parallel large depth-wise convs fused by concat + 1x1.

    Eq. (1) of the paper, ``f_out = delta(f_in, f_5, f_7, f_15, f_31)`` with ``delta`` =
    concatenation followed by a 1x1 convolution, lists ``f_in`` among the fused terms, so
    the unit's input is concatenated too (it doubles as the identity path). Every branch is
    linear (conv -> BN, no activation, as the large-kernel branches of RepLKNet); the
    activation comes after the fusing 1x1 (conv -> BN -> act). The paper calls the
    branches "depth-wise separable": the depth-wise part is each branch, the point-wise part
    is the shared fusing 1x1.

    Args:
        channels: ``k``, the unit's input and output channels.
        dw_kernels: kernel sizes of the parallel depth-wise convolutions.
        dense_kernel: kernel size of the dense convolution.
        activation: activation after the fusion.
        dw_method: the :class:`DepthwiseConv2d` method (``"auto"`` = fastest exact one).
    """

    def __init__(
        self,
        channels: int,
        dw_kernels: Sequence[int] = (7, 15, 31),
        dense_kernel: int = 5,
        activation: str = "relu",
        dw_method: str = "auto",
    ) -> None:
        super().__init__()
        self.dense = conv_bn(channels, channels, dense_kernel, None)
        self.depthwise = nn.ModuleList(
            nn.Sequential(DepthwiseConv2d(channels, k, bias=False, method=dw_method), nn.BatchNorm2d(channels))
            for k in dw_kernels
        )
        self.fuse = conv_bn(channels * (2 + len(dw_kernels)), channels, 1, activation)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, k, h, w) -> (B, k, h, w)``."""
        branches = [x, self.dense(x)] + [branch(x) for branch in self.depthwise]
        return self.fuse(torch.cat(branches, dim=1))


class LRDModule(nn.Module):
    """1x1 reduce to ``k`` -> activation -> LRDU -> 1x1 up to ``d`` (EHSNet §3.2, Fig. 4).

    Both 1x1 convolutions are conv -> BN -> activation.

    Args:
        in_channels: channels of the backbone feature map.
        k: channels inside the LRDU (paper: 256).
        d: output channels (paper: 256).
        dw_kernels: depth-wise kernel sizes (paper: 7, 15, 31).
        dense_kernel: dense kernel size (paper: 5).
        activation: ``relu``, ``gelu`` or ``silu``.
        dw_method: the :class:`DepthwiseConv2d` method.
    """

    def __init__(
        self,
        in_channels: int,
        k: int = 256,
        d: int = 256,
        dw_kernels: Sequence[int] = (7, 15, 31),
        dense_kernel: int = 5,
        activation: str = "relu",
        dw_method: str = "auto",
    ) -> None:
        super().__init__()
        self.out_channels = d
        self.reduce = conv_bn(in_channels, k, 1, activation)
        self.unit = LRDUnit(k, dw_kernels, dense_kernel, activation, dw_method)
        self.increase = conv_bn(k, d, 1, activation)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, Cin, h, w) -> (B, d, h, w)``."""
        return self.increase(self.unit(self.reduce(x)))
