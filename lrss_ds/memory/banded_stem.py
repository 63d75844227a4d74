"""The HRNet stem, conv -> BatchNorm -> ReLU -> conv, run in row bands with exact batch statistics.

Why: at whole-scene sizes the stem's first convolution writes 64 channels at half the input
resolution, the largest maps of the network (3.2 GB for a 6908 x 7300 scene in fp32, 256 MiB at
2048 x 2048). Under checkpointing its recomputation in backward holds that map, the BatchNorm
output and their two gradients at once: at 2048 x 2048 fp32 this was the step's memory peak
(EHSNet-W18, ~1.1 GiB above the rest). Banding it is not a plain loop, because BatchNorm in
training normalises with statistics over the *whole* map, and its backward needs two more
whole-map sums. :class:`BandedStem` computes the same thing in passes over bands of rows, never
holding more than one band of the half-resolution maps:

forward
    A. statistics of ``z1 = conv1(x)``: per-band mean and squared deviations, merged exactly
       (Chan et al.'s pairwise update, in float64);
    B. per band of ``conv2``'s output rows: ``z1`` on the rows it reads (the kernel's halo
       recomputed), ``a1 = relu(gamma * (z1 - mean) / std + beta)``, ``z2 = conv2(a1)``.
backward (given ``dz2``)
    C. per band: ``a1`` recomputed, ``conv2``'s weight gradient from the band's own output rows,
       ``da1`` on the band's rows of ``a1`` from every output row that reads them, ``g = da1``
       where ``a1 > 0``; sums ``dbeta = sum g`` and ``dgamma = sum g * xhat``;
    D. per band: ``g`` again, ``dz1 = gamma / std * (g - dbeta / N - xhat * dgamma / N)`` (the
       BatchNorm backward with batch statistics), ``conv1``'s weight (and input) gradient.

``conv1`` runs four times and the input gradient of ``conv2`` twice, against two and one in a
checkpointed stem: the price of holding one band instead of four whole maps. Results equal the
unbanded stem up to float summation order (equal to 1e-12 in float64, tested). Running
statistics are updated as ``nn.BatchNorm2d`` does (momentum or cumulative average, unbiased
variance, ``num_batches_tracked``), so freezing them for a checkpoint's recomputation works the
same way. Under autocast the convolutions run in the autocast dtype and the normalisation in
float32, as autocast runs ``batch_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.memory.large_conv import memory_format_of


@dataclass(frozen=True)
class _ConvRows:
    """Row geometry of a convolution whose row padding is applied by hand (per band)."""

    kernel: int
    stride: int
    padding: int

    def input_span(self, first: int, last: int) -> tuple[int, int]:
        """Input rows ``[lo, hi)`` that output rows ``[first, last)`` read (may leave the map)."""
        return self.stride * first - self.padding, self.stride * (last - 1) - self.padding + self.kernel

    def readers(self, first: int, last: int, out_rows: int) -> tuple[int, int]:
        """Output rows ``[lo, hi)`` that read any input row of ``[first, last)``, within the map."""
        lo = -(-(first + self.padding - self.kernel + 1) // self.stride)
        hi = (last - 1 + self.padding) // self.stride + 1
        return max(lo, 0), min(hi, out_rows)


def _rows(x: Tensor, first: int, last: int) -> Tensor:
    """Rows ``[first, last)`` of ``x (B, C, H, W)``, zero rows where the range leaves ``[0, H)``."""
    height = x.shape[-2]
    band = x[..., max(first, 0) : min(last, height), :]
    top, bottom = max(0, -first), max(0, last - height)
    if top or bottom:
        band = F.pad(band, (0, 0, top, bottom))
    return band


def _channel(v: Tensor) -> Tensor:
    return v.reshape(1, -1, 1, 1)


class _StemPasses:
    """The per-band computations shared by the forward and the backward passes.

    The elementwise work runs through ATen's fused kernels (eval-mode ``batch_norm`` with the
    whole-map statistics, ``threshold_backward`` for the ReLU, ``native_batch_norm_backward``
    in eval mode for the two sums): written out as tensor arithmetic it took 3/4 of the
    banded stem's time at 2048 x 2048.
    """

    def __init__(self, x: Tensor, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d, band_rows: int,
                 compute: torch.dtype) -> None:
        self.x = x
        self.compute = compute
        self.accumulate = torch.float64 if compute == torch.float64 else torch.float32
        self.fmt = memory_format_of(x)
        self.g1 = _ConvRows(conv1.kernel_size[0], conv1.stride[0], conv1.padding[0])
        self.g2 = _ConvRows(conv2.kernel_size[0], conv2.stride[0], conv2.padding[0])
        self.conv1, self.conv2, self.eps = conv1, conv2, bn1.eps
        self.w1 = conv1.weight.to(compute)
        self.w2 = conv2.weight.to(compute)
        self.gamma = bn1.weight.to(self.accumulate)
        self.beta = bn1.bias.to(self.accumulate)
        height, width = x.shape[-2:]
        self.h1 = (height + 2 * self.g1.padding - self.g1.kernel) // self.g1.stride + 1
        self.w1_out = (width + 2 * conv1.padding[1] - conv1.kernel_size[1]) // conv1.stride[1] + 1
        self.h2 = (self.h1 + 2 * self.g2.padding - self.g2.kernel) // self.g2.stride + 1
        self.w2_out = (self.w1_out + 2 * conv2.padding[1] - conv2.kernel_size[1]) // conv2.stride[1] + 1
        self.count = x.shape[0] * self.h1 * self.w1_out
        # bands of conv2's output rows, each covering about band_rows rows of the half-resolution maps
        step = max(1, band_rows // self.g2.stride)
        self.bands = [(o, min(o + step, self.h2)) for o in range(0, self.h2, step)]
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def set_statistics(self, mean: Tensor, var: Tensor) -> None:
        """The whole-map mean and (biased) variance the normalisation uses."""
        self.mean, self.var = mean.to(self.accumulate), var.to(self.accumulate)

    def own_rows(self, index: int) -> tuple[int, int]:
        """Rows of ``a1`` that band ``index`` owns (a partition of ``[0, h1)``)."""
        first = 0 if index == 0 else self.g2.stride * self.bands[index][0]
        last = self.h1 if index == len(self.bands) - 1 else self.g2.stride * self.bands[index + 1][0]
        return first, last

    def conv(self, band: Tensor, weight: Tensor, conv: nn.Conv2d) -> Tensor:
        """``conv`` on a band whose rows carry their own padding."""
        return F.conv2d(band, weight, None, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)

    def z1(self, first: int, last: int) -> Tensor:
        """``conv1(x)`` on rows ``[first, last)`` of its output (inside the map), accumulate dtype."""
        band = _rows(self.x, *self.g1.input_span(first, last)).to(self.compute)
        return self.conv(band.contiguous(memory_format=self.fmt), self.w1, self.conv1).to(self.accumulate)

    def activate(self, z: Tensor) -> Tensor:
        """``relu(gamma * (z - mean) / std + beta)`` with the whole-map statistics."""
        out = F.batch_norm(z, self.mean, self.var, self.gamma, self.beta, False, 0.0, self.eps)
        return out.relu_()

    def activated(self, first: int, last: int) -> tuple[Tensor, Tensor, int]:
        """``a1`` on rows ``[first, last)``, with zero rows outside the map (conv2's padding).

        Returns:
            ``(a1, z1, lo)``: ``a1`` (accumulate dtype) over the whole range and ``z1`` over
            the rows ``[lo, min(last, h1))`` inside the map.
        """
        lo, hi = max(first, 0), min(last, self.h1)
        z = self.z1(lo, hi)
        act = self.activate(z)
        if (first, last) != (lo, hi):
            act = _rows(act, first - lo, last - lo).contiguous(memory_format=self.fmt)
        return act, z, lo

    def conv2_input_grad(self, dz2: Tensor, first: int, last: int) -> Tensor:
        """``d loss / d a1`` on rows ``[first, last)`` of ``a1`` (inside the map), accumulate dtype."""
        o_lo, o_hi = self.g2.readers(first, last, self.h2)
        span_lo, span_hi = self.g2.input_span(o_lo, o_hi)
        shape = (dz2.shape[0], self.w2.shape[1] * self.conv2.groups, span_hi - span_lo, self.w1_out)
        # only the shape and layout of the input are read for the input gradient
        like = torch.empty(shape, dtype=self.compute, device=dz2.device, memory_format=self.fmt)
        grad = torch.ops.aten.convolution_backward(
            dz2[..., o_lo:o_hi, :].contiguous(memory_format=self.fmt), like, self.w2, None,
            list(self.conv2.stride), [0, self.conv2.padding[1]], list(self.conv2.dilation), False, [0, 0],
            self.conv2.groups, [True, False, False],
        )[0]
        return grad[..., first - span_lo : last - span_lo, :].to(self.accumulate)

    def relu_grad(self, dz2: Tensor, first: int, last: int, act: Tensor) -> Tensor:
        """``g``: the gradient at the BatchNorm's output on rows ``[first, last)`` (``act`` = a1 there)."""
        return torch.ops.aten.threshold_backward(self.conv2_input_grad(dz2, first, last), act, 0)

    def affine_sums(self, g: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum g * xhat, sum g)`` per channel over one band."""
        _, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            g, z, self.gamma, self.mean, self.var, None, None, False, self.eps, [False, True, True]
        )
        return dgamma, dbeta

    def conv_grads(self, grad_out: Tensor, band: Tensor, weight: Tensor, conv: nn.Conv2d,
                   input_grad: bool = False) -> tuple[Tensor | None, Tensor]:
        """``conv``'s weight gradient (and optionally input gradient) for one band."""
        grad_in, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out.to(self.compute).contiguous(memory_format=self.fmt), band, weight, None, list(conv.stride),
            [0, conv.padding[1]], list(conv.dilation), False, [0, 0], conv.groups, [input_grad, True, False],
        )
        return grad_in, grad_w


def _merge_statistics(count: int, mean: Tensor, m2: Tensor, n_b: int, mean_b: Tensor,
                      m2_b: Tensor) -> tuple[int, Tensor, Tensor]:
    """Chan et al.'s pairwise merge of (count, mean, sum of squared deviations)."""
    total = count + n_b
    delta = mean_b - mean
    return total, mean + delta * (n_b / total), m2 + m2_b + delta.square() * (count * n_b / total)


class _BandedStemFunction(torch.autograd.Function):
    """``conv2(relu(bn1(conv1(x))))`` over bands; see the module docstring for the passes."""

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, gamma: Tensor, beta: Tensor, w2: Tensor,  # type: ignore[override]
                stem: "BandedStem", conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d,
                compute: torch.dtype) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            passes = _StemPasses(x, conv1, bn1, conv2, stem.band_rows, compute)
            batch_stats = bn1.training or bn1.running_mean is None
            if batch_stats:
                count, mean, m2 = 0, torch.zeros(()), torch.zeros(())
                for index in range(len(passes.bands)):
                    z = passes.z1(*passes.own_rows(index))
                    # the training-mode kernel is the fast per-channel reduction here (var_mean
                    # over a channels-last map took 3x as long); its normalised output is dropped
                    _, mean_b, invstd_b = torch.ops.aten.native_batch_norm(z, None, None, None, None, True, 0.0,
                                                                            passes.eps)
                    n_b = z.numel() // z.shape[1]
                    var_b = invstd_b.to(torch.float64).pow(-2) - passes.eps
                    mean_b, m2_b = mean_b.to(torch.float64), var_b * n_b
                    if count == 0:
                        count, mean, m2 = n_b, mean_b, m2_b
                    else:
                        count, mean, m2 = _merge_statistics(count, mean, m2, n_b, mean_b, m2_b)
                var = m2 / count
                _update_running_statistics(bn1, mean, m2 / max(count - 1, 1))
            else:
                mean, var = bn1.running_mean, bn1.running_var
            passes.set_statistics(mean, var)
            out = torch.empty((x.shape[0], w2.shape[0], passes.h2, passes.w2_out), dtype=compute,
                              device=x.device, memory_format=passes.fmt)
            for o_lo, o_hi in passes.bands:
                act, _, _ = passes.activated(*passes.g2.input_span(o_lo, o_hi))
                out[..., o_lo:o_hi, :] = passes.conv(act.to(compute), passes.w2, conv2)
        ctx.save_for_backward(x, w1, gamma, beta, w2, passes.mean, passes.var)
        ctx.stem_modules = (stem, conv1, bn1, conv2)
        ctx.batch_stats = batch_stats
        ctx.compute = compute
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz2: Tensor):  # type: ignore[override]
        x, w1, gamma, beta, w2, mean, var = ctx.saved_tensors
        stem, conv1, bn1, conv2 = ctx.stem_modules
        with torch.autocast(x.device.type, enabled=False):
            passes = _StemPasses(x, conv1, bn1, conv2, stem.band_rows, ctx.compute)
            passes.set_statistics(mean, var)
            acc = passes.accumulate
            dz2 = dz2.to(ctx.compute)
            grad_dtype = torch.float64 if acc == torch.float64 else torch.float32
            grad_w2 = torch.zeros(w2.shape, dtype=grad_dtype, device=x.device)
            dgamma = torch.zeros(gamma.shape, dtype=torch.float64, device=x.device)
            dbeta = torch.zeros_like(dgamma)
            # C: conv2's weight gradient; sums of g and g * xhat over the whole map
            for index, (o_lo, o_hi) in enumerate(passes.bands):
                # one recomputation of conv1 serves conv2's input rows and the band's own rows
                span_lo, span_hi = passes.g2.input_span(o_lo, o_hi)
                first, last = passes.own_rows(index)
                region_lo, region_hi = min(span_lo, first), max(span_hi, last)
                act, z, lo = passes.activated(region_lo, region_hi)
                act_span = act[..., span_lo - region_lo : span_hi - region_lo, :].to(ctx.compute)
                _, grad = passes.conv_grads(dz2[..., o_lo:o_hi, :], act_span, passes.w2, conv2)
                grad_w2 += grad.to(grad_dtype)
                del act_span
                z = z[..., first - lo : last - lo, :]
                g = passes.relu_grad(dz2, first, last, act[..., first - region_lo : last - region_lo, :])
                del act
                dgamma_b, dbeta_b = passes.affine_sums(g, z)
                dgamma += dgamma_b.to(torch.float64)
                dbeta += dbeta_b.to(torch.float64)
            # D: BatchNorm's input gradient, then conv1's weight (and input) gradient
            need_dx = ctx.needs_input_grad[0]
            grad_x = torch.zeros_like(x, dtype=acc) if need_dx else None
            grad_w1 = torch.zeros(w1.shape, dtype=grad_dtype, device=x.device)
            # dz1 = scale * (g - mean(g) - xhat * mean(g * xhat)) = scale * g + z * slope + offset
            # per channel, with xhat = (z - mean) * invstd; with running statistics only scale * g
            invstd = (var.to(torch.float64) + passes.eps).rsqrt()
            scale = gamma.to(torch.float64) * invstd
            slope = -scale * invstd * dgamma / passes.count
            offset = -scale * dbeta / passes.count - slope * mean.to(torch.float64)
            scale, slope, offset = (_channel(v.to(acc)) for v in (scale, slope, offset))
            for index in range(len(passes.bands)):
                first, last = passes.own_rows(index)
                z = passes.z1(first, last)
                g = passes.relu_grad(dz2, first, last, passes.activate(z))
                if ctx.batch_stats:
                    dz1 = torch.addcmul(offset, z, slope).addcmul_(g, scale)
                else:
                    dz1 = g.mul_(scale)
                del g, z
                span_lo, span_hi = passes.g1.input_span(first, last)
                band = _rows(x, span_lo, span_hi).to(ctx.compute).contiguous(memory_format=passes.fmt)
                grad_band, grad = passes.conv_grads(dz1, band, passes.w1, conv1, need_dx)
                grad_w1 += grad.to(grad_dtype)
                if grad_x is not None and grad_band is not None:
                    lo, hi = max(span_lo, 0), min(span_hi, x.shape[-2])
                    grad_x[..., lo:hi, :] += grad_band[..., lo - span_lo : hi - span_lo, :].to(acc)
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            grad_w1.to(w1.dtype),
            dgamma.to(gamma.dtype),
            dbeta.to(beta.dtype),
            grad_w2.to(w2.dtype),
            None, None, None, None, None,
        )


def _update_running_statistics(bn: nn.BatchNorm2d, mean: Tensor, unbiased_var: Tensor) -> None:
    """What ``F.batch_norm`` does to the running statistics of a training BatchNorm."""
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None or bn.running_var is None:
        return
    factor = bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if factor is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    if factor is None:
        factor = 0.0
    bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
    bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype), alpha=factor)


@dataclass(frozen=True)
class BandedStem:
    """``conv2(relu(bn1(conv1(x))))`` computed in bands of ``band_rows`` rows of ``conv1``'s output.

    Installed on an HRNet as its ``stem_core`` by the memory layer (memory mode
    ``stem_band_rows``); :meth:`supports` says whether a given stem can run banded.

    Band size: on this CPU (one thread, 2048 x 2048, 64 channels), bands of 16-64 rows ran the
    stem's forward + backward in 1.5 s against 1.7 s for the unbanded layers (a band's maps fit
    the cache), while 128 and 256 rows took 3.0 s; the presets use 32.

    Args:
        band_rows: rows of the half-resolution maps per band (rounded down to a multiple of
            ``conv2``'s stride).
    """

    band_rows: int = 32

    @staticmethod
    def supports(conv1: nn.Conv2d, bn1: nn.Module, conv2: nn.Conv2d) -> bool:
        """True for zero-padded, undilated, bias-free convolutions around an affine BatchNorm2d."""
        convs_ok = all(
            isinstance(c, nn.Conv2d) and c.bias is None and c.padding_mode == "zeros"
            and not isinstance(c.padding, str) and c.dilation == (1, 1)
            for c in (conv1, conv2)
        )
        return convs_ok and isinstance(bn1, nn.BatchNorm2d) and bn1.affine

    def __call__(self, x: Tensor, conv1: nn.Conv2d, bn1: nn.BatchNorm2d, conv2: nn.Conv2d) -> Tensor:
        """``conv2(relu(bn1(conv1(x))))`` for ``x (B, C, H, W)``; running statistics updated in training."""
        compute = x.dtype
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            compute = torch.get_autocast_dtype(x.device.type)
        return _BandedStemFunction.apply(x, conv1.weight, bn1.weight, bn1.bias, conv2.weight, self, conv1, bn1, conv2,
                                         compute)


def install_stem_banding(model: nn.Module, band_rows: int | None) -> int:
    """Give every module of ``model`` with a ``stem_core`` slot (HRNet) a :class:`BandedStem`.

    Args:
        model: the model.
        band_rows: rows per band; ``None`` puts the stems' own layers back.

    Returns:
        how many stems run banded.

    Raises:
        ConfigError: if a stem's layers are not what the banded computation supports.
    """
    count = 0
    for name, module in model.named_modules():
        if not hasattr(module, "stem_core"):
            continue
        if band_rows is None:
            module.stem_core = None
            continue
        if not BandedStem.supports(module.conv1, module.bn1, module.conv2):
            raise ConfigError("memory.stem_band_rows", f"the stem of {name or type(module).__name__} cannot run "
                              "banded (needs bias-free, zero-padded, undilated convolutions around a BatchNorm2d)")
        module.stem_core = BandedStem(band_rows)
        count += 1
    return count


__all__ = ["BandedStem", "install_stem_banding"]
