"""BatchNorm over the whole scene: per-channel statistics and gradient sums reduced over the spatial group."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.parallel.group import SpatialGroup


# Elements of a band cast to float64 at a time. A cast of the whole band (``x.to(float64)``, and
# ``x.sum(dtype=float64)`` too) is twice its float32 size, and the squares or products another
# copy: measured on a 64 x 512 x 1024 float32 band (128 MiB), the forward's peak 514 MiB above
# the input and the backward's 801 MiB, where nn.BatchNorm2d's are 130 and 162 MiB; at the stem
# of a 2048 x 2048 scene split over two ranks that outweighed the halved activations.
SUM_CHUNK_ELEMENTS = 1 << 20


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    """Sums are taken in float64: the scene's per-channel sums then do not depend on the split."""
    return torch.float64 if dtype.is_floating_point else dtype


def _channel_sums(x: Tensor, other: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel ``(sum of x, sum of x * other)`` (``other`` None: ``x * x``) in float64, by row chunks.

    Only one chunk of :data:`SUM_CHUNK_ELEMENTS` elements is cast at a time, so the transient
    memory does not grow with the band.
    """
    acc = _accumulation(x.dtype)
    dims = (0, 2, 3)
    per_row = max(1, x.shape[0] * x.shape[1] * x.shape[3])
    step = max(1, SUM_CHUNK_ELEMENTS // per_row)
    total = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    products = torch.zeros(x.shape[1], dtype=acc, device=x.device)
    for start in range(0, x.shape[2], step):
        part = x[:, :, start : start + step].to(acc)
        total += part.sum(dims)
        partner = part if other is None else other[:, :, start : start + step].to(acc)
        products += (part * partner).sum(dims)
    return total, products


class _SpatialBatchNorm(torch.autograd.Function):
    """Normalise with the group's per-channel mean and biased variance; backward reduces the two gradient sums."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: SpatialGroup
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = _accumulation(x.dtype)
        sums, squares = _channel_sums(x)
        local = torch.cat([sums, squares, torch.tensor([x.numel() // x.shape[1]], dtype=acc, device=x.device)])
        channels = x.shape[1]
        total = group.comm.all_reduce(local, group=group.group)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels : 2 * channels] / count - mean**2).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        shape = (1, -1, 1, 1)
        xhat = (x - mean.to(x.dtype).view(shape)).mul_(invstd.to(x.dtype).view(shape))  # one band-sized temporary
        out = xhat
        if weight is not None:
            out = torch.addcmul(bias.view(shape), xhat, weight.view(shape))
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.group, ctx.count = group, count
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var * count / (count - 1).clamp_min(1.0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _mean: Tensor, _var: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        xhat, weight, invstd = ctx.saved_tensors
        group: SpatialGroup = ctx.group
        sum_grad, sum_grad_xhat = _channel_sums(grad, xhat)
        total = group.comm.all_reduce(torch.cat([sum_grad, sum_grad_xhat]), group=group.group)
        channels = grad.shape[1]
        shape = (1, -1, 1, 1)
        mean_grad = (total[:channels] / ctx.count).to(grad.dtype).view(shape)
        mean_grad_xhat = (total[channels:] / ctx.count).to(grad.dtype).view(shape)
        scale = invstd.to(grad.dtype).view(shape)
        if weight is not None:
            scale = scale * weight.view(shape)
        grad_x = (xhat * mean_grad_xhat).neg_().add_(grad).sub_(mean_grad).mul_(scale)  # one band-sized temporary
        # this band's share of the parameter gradients: the group's sum is the scene's
        grad_weight = sum_grad_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_grad.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None


class SpatialBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose batch statistics are the whole scene's, over the bands of a spatial group.

    Forward all-reduces per-channel sum, sum of squares and count (sums in float64); backward
    all-reduces the sums of the gradient and of the gradient times the normalised input. The
    running statistics get the scene's mean and unbiased variance, the same on every rank. Eval
    mode (running statistics) needs no communication.

    Build with :meth:`from_batchnorm`; ``spatial`` is the :class:`SpatialGroup`.
    """

    spatial: SpatialGroup

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, group: SpatialGroup) -> "SpatialBatchNorm2d":
        """The spatial version of ``bn``, holding ``bn``'s own parameters and running buffers."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        new.train(bn.training)
        new.spatial = group
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, W)`` band in, normalised band out."""
        if not self.training and self.track_running_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        out, mean, var_unbiased = _SpatialBatchNorm.apply(x, self.weight, self.bias, self.eps, self.spatial)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var_unbiased.to(self.running_var.dtype), alpha=factor)
        return out
