"""Convolutions whose tensors pass 2 GiB run in row bands, because oneDNN's fast kernels stop there.

Found here (torch 2.13 CPU build, oneDNN): once a convolution's input or output holds more than
2**31 bytes, its weight gradient runs ``ref_convolution_bwd_weights_t``, oneDNN's reference
kernel, which streams the whole tensor once per weight element. EHSNet's 64-channel stem output
at half the resolution of a whole FBP scene is 3.2 GB in fp32: the fp32 whole-scene step sat in
that kernel for over 25 minutes (the same layer at 512 x 512 takes 0.03 s), while in bf16
(1.6 GB) the optimised kernel ran. Splitting such a convolution into bands of output rows, each
reading its input rows plus the kernel's halo, keeps every call under the limit. The output and
input gradient are exact; the weight and bias gradients are sums over bands, so they differ
from the unbanded ones only by float summation order.

:func:`install_large_conv_banding` turns every plain ``nn.Conv2d`` of a model into a
:class:`LargeSafeConv2d`; a call whose tensors are under the limit (almost all of them) runs
the ordinary convolution. A 1x1 convolution whose tensors pass 64 MiB runs as a matrix product
instead (:mod:`lrss_ds.models.pointwise`), which needs neither bands nor oneDNN's scratch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.models.pointwise import pointwise_conv2d

ONEDNN_LIMIT_BYTES = 1 << 31
# From this size of input or output on, a 1x1 convolution runs as a matrix product
# (lrss_ds.models.pointwise): oneDNN's backward holds about its input gradient's size again as
# scratch, which at 64 MiB and up is worth avoiding, and the product's forward and backward are
# the same function.
POINTWISE_MATMUL_BYTES = 1 << 26
# Bands are sized well under the limit: oneDNN's scratchpads and reorders add to each call.
BAND_BYTES = 1 << 29


def _output_rows(height: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (height + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def needs_banding(x: Tensor, weight: Tensor, stride: tuple[int, int], padding: tuple[int, int],
                  dilation: tuple[int, int], limit_bytes: int = ONEDNN_LIMIT_BYTES) -> bool:
    """True when a CPU convolution of ``x (B, C, H, W)`` would read or write more than ``limit_bytes``.

    Bytes are counted in the dtype the convolution computes in (autocast's, when active).
    """
    if x.device.type != "cpu" or x.dim() != 4:
        return False
    n, _, height, width = x.shape
    out_h = _output_rows(height, weight.shape[2], stride[0], padding[0], dilation[0])
    out_w = _output_rows(width, weight.shape[3], stride[1], padding[1], dilation[1])
    element = torch.empty((), dtype=_compute_dtype(x)).element_size()
    return max(x.numel(), n * weight.shape[0] * out_h * out_w) * element > limit_bytes


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU convolution of ``x`` computes in: autocast's for float32/16 inputs."""
    if torch.is_autocast_enabled("cpu") and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


def memory_format_of(x: Tensor) -> torch.memory_format:
    """Channels-last when channels are innermost (also for slices, whose batch stride breaks
    ``is_contiguous(memory_format=torch.channels_last)``)."""
    return torch.channels_last if x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 else torch.contiguous_format


def _band_rows(x: Tensor, weight: Tensor, out_h: int, out_w: int, stride: int, band_bytes: int) -> int:
    """Output rows per band so that the band's input and output each stay under ``band_bytes``."""
    n, channels, _, width = x.shape
    element = 4  # plan for fp32; bf16 bands are then half as large, which is harmless
    out_row = n * weight.shape[0] * out_w * element
    in_row = n * channels * width * element * stride
    return max(1, min(out_h, band_bytes // max(out_row, in_row, 1)))


def _input_band(x: Tensor, first: int, last: int, kernel: int, stride: int, padding: int,
                dilation: int) -> tuple[Tensor, int, int, int]:
    """Input rows that output rows ``[first, last)`` read, zero-padded at the image's edges.

    Returns:
        ``(band, start, pad_top, pad_bottom)``: ``band`` holds input rows ``[start, start +
        band rows - pads)`` with ``pad_top`` / ``pad_bottom`` zero rows added.
    """
    height = x.shape[2]
    begin = first * stride - padding
    end = (last - 1) * stride - padding + dilation * (kernel - 1) + 1
    start, stop = max(0, begin), min(height, end)
    pad_top, pad_bottom = start - begin, end - stop
    band = x[:, :, start:stop]
    if pad_top or pad_bottom:
        band = F.pad(band, (0, 0, pad_top, pad_bottom))
    return band, start, pad_top, pad_bottom


class _BandedConv2d(torch.autograd.Function):
    """``F.conv2d`` computed in bands of output rows, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],  # type: ignore[override]
                padding: tuple[int, int], dilation: tuple[int, int], groups: int, band_bytes: int) -> Tensor:
        # Autocast does not reach inside a Function's forward: cast as it would have.
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        bc = None if bias is None else bias.to(dtype)
        kernel = weight.shape[2]
        out_h = _output_rows(x.shape[2], kernel, stride[0], padding[0], dilation[0])
        out_w = _output_rows(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
        rows = _band_rows(x, weight, out_h, out_w, stride[0], band_bytes)
        fmt = memory_format_of(x)
        out = torch.empty((x.shape[0], weight.shape[0], out_h, out_w), dtype=dtype, device=x.device, memory_format=fmt)
        with torch.autocast("cpu", enabled=False):
            for first in range(0, out_h, rows):
                last = min(out_h, first + rows)
                band, *_ = _input_band(xc, first, last, kernel, stride[0], padding[0], dilation[0])
                out[:, :, first:last] = F.conv2d(band, wc, bc, stride, (0, padding[1]), dilation, groups)
        # Save the input in the compute dtype, as the built-in convolution under autocast does.
        ctx.save_for_backward(xc, wc)
        ctx.conf = (stride, padding, dilation, groups, rows, bias is not None, x.dtype, weight.dtype,
                    bias.dtype if bias is not None else None, fmt)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        xc, wc = ctx.saved_tensors
        stride, padding, dilation, groups, rows, has_bias, x_dtype, weight_dtype, bias_dtype, fmt = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]
        grad_out = grad_out.to(wc.dtype)
        kernel = wc.shape[2]
        out_h = grad_out.shape[2]
        grad_x = torch.zeros_like(xc, dtype=x_dtype, memory_format=fmt) if need_x else None
        # Accumulate the weight gradient in fp32 at least: it is a sum over every band.
        accumulate = torch.float64 if wc.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(wc.shape, dtype=accumulate, device=wc.device) if need_w else None
        for first in range(0, out_h, rows):
            last = min(out_h, first + rows)
            band, start, pad_top, pad_bottom = _input_band(xc, first, last, kernel, stride[0], padding[0], dilation[0])
            gx, gw, _ = torch.ops.aten.convolution_backward(
                grad_out[:, :, first:last].contiguous(memory_format=fmt), band, wc, None, stride,
                (0, padding[1]), dilation, False, (0, 0), groups, (need_x, need_w, False),
            )
            if need_w:
                grad_w += gw.to(accumulate)
            if need_x:
                inside = gx[:, :, pad_top : gx.shape[2] - pad_bottom]
                grad_x[:, :, start : start + inside.shape[2]] += inside.to(x_dtype)
        grad_b = None
        if need_b:
            grad_b = grad_out.sum(dim=(0, 2, 3), dtype=accumulate).to(bias_dtype)
        return (grad_x, grad_w.to(weight_dtype) if need_w else None, grad_b, None, None, None, None, None)


def banded_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: tuple[int, int] = (1, 1),
                  padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1), groups: int = 1,
                  band_bytes: int = BAND_BYTES) -> Tensor:
    """``F.conv2d`` (zero padding) in bands of output rows whose tensors stay under ``band_bytes``.

    Args:
        x: ``(B, C, H, W)`` input.
        weight, bias, stride, padding, dilation, groups: as for ``F.conv2d`` (pairs, not ints).
        band_bytes: the most bytes a band's input or output may hold (at least one row is taken).

    Returns:
        ``(B, C_out, H_out, W_out)``, in ``x``'s memory format.
    """
    return _BandedConv2d.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, band_bytes)


class LargeSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward runs in row bands when its tensors pass oneDNN's 2 GiB limit.

    Installed by swapping the class of plain ``nn.Conv2d`` modules (parameters, hooks and state
    dict keys stay as they are), so whole-model pickling and copies keep working.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self._is_plain_pointwise() and needs_banding(x, self.weight, (1, 1), (0, 0), (1, 1), POINTWISE_MATMUL_BYTES):
            return pointwise_conv2d(x, self.weight, self.bias)
        if (
            self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and needs_banding(x, self.weight, self.stride, self.padding, self.dilation, ONEDNN_LIMIT_BYTES)
        ):
            return banded_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                                 BAND_BYTES)
        return super().forward(x)

    def _is_plain_pointwise(self) -> bool:
        """A 1x1 kernel, stride 1, no padding or dilation, one group: a matrix product per position."""
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid", "same")
                and self.dilation == (1, 1) and self.groups == 1)


def install_large_conv_banding(model: nn.Module) -> int:
    """Make every plain ``nn.Conv2d`` in ``model`` a :class:`LargeSafeConv2d` (idempotent).

    Subclasses of ``nn.Conv2d`` keep their class: their own forward or weight transform must not
    be bypassed.

    Returns:
        How many convolutions were converted.
    """
    count = 0
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = LargeSafeConv2d
            count += 1
    return count


__all__ = ["ONEDNN_LIMIT_BYTES", "POINTWISE_MATMUL_BYTES", "LargeSafeConv2d", "banded_conv2d", "install_large_conv_banding", "needs_banding"]
