"""Depth-wise convolutions with large kernels, dispatched to the fastest exact method."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS: tuple[str, ...] = ("auto", "direct")


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, method: str = "auto") -> Tensor:
    """Depth-wise 'same' convolution (odd kernel, stride 1, zero padding ``K // 2``).

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(C, 1, K, K)`` with ``K`` odd.
        bias: ``(C,)`` or None.
        method: ``"auto"`` picks the fastest exact method for the kernel size and device;
            ``"direct"`` is ``F.conv2d(..., groups=C)``.

    Returns:
        ``(B, C, H, W)``, equal to ``F.conv2d(x, weight, bias, padding=K // 2, groups=C)``.

    Raises:
        ValueError: unknown method or an even kernel.
    """
    if method not in METHODS:
        raise ValueError(f"depthwise_conv2d: unknown method {method!r}; choose from {METHODS}")
    kernel = weight.shape[-1]
    if kernel % 2 == 0 or weight.shape[-2] != kernel:
        raise ValueError(f"depthwise_conv2d: kernel must be square and odd, got {tuple(weight.shape)}")
    return F.conv2d(x, weight, bias, padding=kernel // 2, groups=x.shape[1])


class DepthwiseConv2d(nn.Module):
    """A ``K x K`` depth-wise 'same' convolution that runs the fastest exact method.

    The parameters have the standard layout of ``nn.Conv2d(C, C, K, padding=K // 2,
    groups=C)`` (``weight (C, 1, K, K)``, ``bias (C,)``), so state dicts are interchangeable.

    Args:
        channels: ``C``, input = output channels.
        kernel_size: ``K``, odd.
        bias: whether to add a learned bias.
        method: see :func:`depthwise_conv2d`.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, method: str = "auto") -> None:
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"DepthwiseConv2d: kernel_size must be odd and positive, got {kernel_size}")
        if method not in METHODS:
            raise ValueError(f"DepthwiseConv2d: unknown method {method!r}; choose from {METHODS}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.method = method
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ``nn.Conv2d`` does (Kaiming-uniform, fan-in ``K * K``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.kernel_size * self.kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return depthwise_conv2d(x, self.weight, self.bias, self.method)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, method={self.method}"
