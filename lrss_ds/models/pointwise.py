"""1x1 convolutions as matrix products, whose backward needs no scratch beyond its gradients.

On the CPU, oneDNN's backward of a 1x1 convolution over a large map holds a buffer about the
size of its input gradient beside it, outside any tensor (measured, torch 2.13 CPU, fp32, one
training step of EHSNet-W18 on a whole 6908 x 7300 scene: 776-849 MiB inside each 1x1
convolution's backward at the 864 x 920 output stride, 256 channels; 0.8-1.15 GiB in the ECR's
key and value projections). The same function as a matrix product has a backward of two
products and no scratch; it computes the same values up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def project_positions(weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """A 1x1 convolution of ``x (B, C, h, w)`` by ``weight (C_out, C, 1, 1)``, as ``(B, C_out, h * w)``, channels first.

    Any memory format of ``x`` is read without a copy (a channels-last map is a transposed
    matrix to the product); the result is contiguous.
    """
    matrix = weight.flatten(1)  # (C_out, C)
    out = torch.bmm(matrix.expand(x.shape[0], *matrix.shape), x.flatten(2))
    # in place: the product's backward does not need its output, and an expanded bias under
    # autocast would be cast (and so materialised) at the map's full size
    return out if bias is None else out.add_(bias.view(1, -1, 1))


def pointwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1, stride-1, unpadded, ungrouped ``weight``, in ``x``'s memory format."""
    if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1:  # channels last: rows of C values
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    batch, _, height, width = x.shape
    return project_positions(weight, bias, x).view(batch, -1, height, width)


class PositionProjection(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (same parameters and state-dict keys) whose output is :func:`project_positions`' ``(B, C_out, h * w)``.

    Called as a module, so that hooks on it run (ZeRO-3 gathers a module's parameters in its
    forward pre-hook; reading ``weight`` from outside the call would find an empty partition).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return project_positions(self.weight, self.bias, x)


__all__ = ["PositionProjection", "pointwise_conv2d", "project_positions"]
