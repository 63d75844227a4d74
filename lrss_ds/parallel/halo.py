"""Halo exchange: the rows a layer reads across a band boundary, sent to and from their owners."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.models.base import Resize
from lrss_ds.models.large_kernel import DepthwiseConv2d, depthwise_conv2d
from lrss_ds.parallel.group import SpatialGroup

Transfers = dict[int, tuple[int, int]]
"""``{peer: (first, stop)}`` half-open row ranges (local rows of the sender's band)."""


def _transfers(rows: list[int], me: int, top: int, bottom: int) -> tuple[Transfers, Transfers, int, int]:
    """Who sends which rows to whom so that every band gains ``top``/``bottom`` rows of halo.

    Returns:
        ``(sends, receives, first, stop)``: rows of this band each peer needs (local rows),
        rows each peer sends here (the peer's local rows), and the global rows
        ``[first, stop)`` this band's extended block covers (the halo clipped to the scene).
    """
    starts = [sum(rows[:r]) for r in range(len(rows) + 1)]
    height = starts[-1]

    def need(rank: int) -> tuple[int, int]:
        return max(starts[rank] - top, 0), min(starts[rank + 1] + bottom, height)

    sends: Transfers = {}
    receives: Transfers = {}
    for peer in range(len(rows)):
        if peer == me:
            continue
        first, stop = need(peer)
        a, b = max(first, starts[me]), min(stop, starts[me + 1])
        if a < b:
            sends[peer] = (a - starts[me], b - starts[me])
        first, stop = need(me)
        a, b = max(first, starts[peer]), min(stop, starts[peer + 1])
        if a < b:
            receives[peer] = (a - starts[peer], b - starts[peer])
    first, stop = need(me)
    return sends, receives, first, stop


class _HaloExchange(torch.autograd.Function):
    """Extend a band by its neighbours' rows; backward returns each halo row's gradient to its owner."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: SpatialGroup, rows: list[int], top: int, bottom: int) -> Tensor:  # type: ignore[override]
        sends, receives, _, _ = _transfers(rows, group.rank, top, bottom)
        got = group.exchange(
            {peer: x[:, :, a:b] for peer, (a, b) in sends.items()},
            {peer: (*x.shape[:2], b - a, x.shape[3]) for peer, (a, b) in receives.items()},
            x,
        )
        above = [got[peer] for peer in sorted(got) if peer < group.rank]
        below = [got[peer] for peer in sorted(got) if peer > group.rank]
        ctx.group, ctx.sends, ctx.receives = group, sends, receives
        ctx.above = sum(t.shape[2] for t in above)
        ctx.band = x.shape[2]
        return torch.cat([*above, x, *below], dim=2) if got else x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        group: SpatialGroup = ctx.group
        # the forward concatenated [peers above..., own band, peers below...]
        offsets, start = {}, 0
        for peer in sorted(p for p in ctx.receives if p < group.rank):
            a, b = ctx.receives[peer]
            offsets[peer] = (start, start + b - a)
            start += b - a
        start += ctx.band
        for peer in sorted(p for p in ctx.receives if p > group.rank):
            a, b = ctx.receives[peer]
            offsets[peer] = (start, start + b - a)
            start += b - a
        returned = group.exchange(
            {peer: grad[:, :, a:b] for peer, (a, b) in offsets.items()},
            {peer: (*grad.shape[:2], b - a, grad.shape[3]) for peer, (a, b) in ctx.sends.items()},
            grad,
        )
        grad_band = grad[:, :, ctx.above : ctx.above + ctx.band].clone()
        for peer, (a, b) in ctx.sends.items():
            grad_band[:, :, a:b] += returned[peer]
        return grad_band, None, None, None, None


def halo_rows(x: Tensor, group: SpatialGroup, top: int, bottom: int) -> tuple[Tensor, int, int]:
    """This band with up to ``top`` rows above and ``bottom`` below from the ranks that own them.

    Rows beyond the scene's edges do not exist and are not added; the caller pads for them.
    Works for halos taller than a neighbour's band (rows come from every rank they lie on).
    Every rank of the group must call it with the same ``top``/``bottom`` at the same point.

    Args:
        x: ``(B, C, h, W)`` this rank's band at some resolution.
        group: the spatial group (after :meth:`SpatialGroup.begin`).
        top: halo rows wanted above.
        bottom: halo rows wanted below.

    Returns:
        ``(block, missing_top, missing_bottom)``: ``block (B, C, h + top + bottom - missing, W)``
        and the halo rows that fell outside the scene at each end.
    """
    rows = group.level_rows(x.shape[2])
    _, _, first, stop = _transfers(rows, group.rank, top, bottom)
    start = sum(rows[: group.rank])
    missing_top = top - (start - first)
    missing_bottom = bottom - (stop - start - rows[group.rank])
    if top == 0 and bottom == 0:
        return x, 0, 0
    return _HaloExchange.apply(x, group, rows, top, bottom), missing_top, missing_bottom


class _HaloEdges(torch.autograd.Function):
    """The band itself (an alias, no copy) and the halo rows above and below it, apart.

    Rows beyond the scene are not added; a side without halo rows is an empty block. Backward
    returns each halo row's gradient to its owner and adds the gradients returned to this band's
    sent rows into the band's gradient in place (the alias feeds only the band's convolution,
    whose input gradient is used nowhere else). Every rank of the group calls it at the same point.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, group: SpatialGroup, rows: list[int], top: int, bottom: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        sends, receives, _, _ = _transfers(rows, group.rank, top, bottom)
        got = group.exchange(
            {peer: x[:, :, a:b] for peer, (a, b) in sends.items()},
            {peer: (*x.shape[:2], b - a, x.shape[3]) for peer, (a, b) in receives.items()},
            x,
        )
        empty = x.new_empty((*x.shape[:2], 0, x.shape[3]))
        above = torch.cat([got[peer] for peer in sorted(got) if peer < group.rank] or [empty], dim=2)
        below = torch.cat([got[peer] for peer in sorted(got) if peer > group.rank] or [empty], dim=2)
        ctx.group, ctx.sends, ctx.receives = group, sends, receives
        return x, above, below

    @staticmethod
    def backward(ctx: Any, grad_band: Tensor, grad_above: Tensor, grad_below: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        group: SpatialGroup = ctx.group
        halo_grads = {}
        for peers, grad in (
            (sorted(p for p in ctx.receives if p < group.rank), grad_above),
            (sorted(p for p in ctx.receives if p > group.rank), grad_below),
        ):
            start = 0
            for peer in peers:
                a, b = ctx.receives[peer]
                halo_grads[peer] = grad[:, :, start : start + b - a]
                start += b - a
        returned = group.exchange(
            halo_grads,
            {peer: (*grad_band.shape[:2], b - a, grad_band.shape[3]) for peer, (a, b) in ctx.sends.items()},
            grad_band,
        )
        for peer, (a, b) in ctx.sends.items():
            grad_band[:, :, a:b] += returned[peer]
        return grad_band, None, None, None, None


class _AddRows(torch.autograd.Function):
    """``out[:, :, :len(top)] += top`` and ``out[:, :, first:first + len(bottom)] += bottom``, in place.

    Backward passes the gradient through unchanged (no copy, unlike an in-place write through
    autograd's slices, which clones the whole gradient) and the blocks' gradients as views.
    """

    @staticmethod
    def forward(ctx: Any, out: Tensor, top: Tensor, first: int, bottom: Tensor) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            out[:, :, : top.shape[2]] += top
            out[:, :, first : first + bottom.shape[2]] += bottom
        ctx.mark_dirty(out)
        ctx.rows, ctx.first, ctx.bottom = top.shape[2], first, bottom.shape[2]
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return grad, grad[:, :, : ctx.rows], None, grad[:, :, ctx.first : ctx.first + ctx.bottom]


def _halo_convolve(
    x: Tensor, group: SpatialGroup, kernel: int, stride: int, padding: int, dilation: int,
    padded: Callable[[Tensor], Tensor], valid: Callable[[Tensor], Tensor], halo_part: Callable[[Tensor], Tensor],
) -> Tensor:
    """A convolution in height over a band, without a copy of the band.

    ``padded(t)`` convolves with the layer's height padding, ``valid(t)`` with none, and
    ``halo_part(t)`` like ``valid`` without the bias (all with the layer's own width handling).
    The band is convolved as it is, zero-padded in height: that is the scene's convolution except
    for the rows that read a neighbour's rows, where the zeros stand for them. Convolution being
    linear, those rows gain ``halo_part`` of a small block holding only the halo rows (the band's
    rows zero), one block per side; a row reading both sides gains both. The band's convolution
    saves the band the previous layer already holds, not a padded copy of it.
    Layers whose output is shorter than ``height / stride`` (padding below the 'same' amount,
    which a band cannot match to one rank anyway) convolve one block of band and halos as before.
    """
    k, s, p, d = kernel, stride, padding, dilation
    height = x.shape[2]
    n = height // s
    below = (k - 1) * d + 1 - s - p
    top, bottom = p, max(below, 0)
    if top == 0 and bottom == 0:
        return padded(x)[:, :, :n]
    rows = group.level_rows(height)
    _, _, first, stop = _transfers(rows, group.rank, top, bottom)
    start = sum(rows[: group.rank])
    missing_top = top - (start - first)
    missing_bottom = bottom - (stop - start - rows[group.rank])
    head = ((min(-(-p // s), n) - 1) * s - p + (k - 1) * d + 1)  # band rows read by the rows reading above
    if below > p or head < 0:
        block, missing_top, missing_bottom = halo_rows(x, group, top, bottom)
        if missing_top or missing_bottom:
            block = F.pad(block, (0, 0, missing_top, missing_bottom))
        return valid(block)[:, :, :n]
    band, above, beneath = _HaloEdges.apply(x, group, rows, top, bottom)
    out = padded(band)
    if above.shape[2] or beneath.shape[2]:
        fix_top = fix_bottom = out.new_empty((*out.shape[:2], 0, out.shape[3]))
        if above.shape[2]:
            fix_top = halo_part(F.pad(above, (0, 0, missing_top, head)))
        first_bottom = max(0, -(-(height + p - (k - 1) * d) // s))  # the first output row reading below the band
        if beneath.shape[2]:
            fix_bottom = halo_part(F.pad(beneath, (0, 0, height - (first_bottom * s - p), missing_bottom)))
        out = _AddRows.apply(out, fix_top, first_bottom, fix_bottom)
    return out[:, :, :n] if out.shape[2] > n else out


def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


class HaloConv2d(nn.Conv2d):
    """A ``Conv2d`` over a band that reads its neighbours' rows inside its receptive field.

    Any kernel, stride, dilation and groups with zero padding given as numbers. Output row ``o``
    of the scene reads input rows ``o * s - p + j * d`` (``j < k``); this band's outputs start at
    ``start / s``, so the band reads ``p`` rows from above and ``(k - 1) d + 1 - s - p`` from below.
    The band itself is convolved with the layer's padding and the rows next to a neighbour gain
    the halo rows' part (:func:`_halo_convolve`), so only the band is saved for backward.
    Band heights must be multiples of the stride (:func:`band_bounds` guarantees it).

    Build with :meth:`from_conv`; ``spatial`` is the :class:`SpatialGroup`.
    """

    spatial: SpatialGroup

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group: SpatialGroup) -> "HaloConv2d":
        """The spatial version of ``conv``, holding ``conv``'s own parameters.

        Raises:
            ValueError: string padding or a padding mode other than zeros.
        """
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"spatial convolution needs numeric zero padding, got {conv.padding!r}/{conv.padding_mode}")
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        new.spatial = group
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, W)`` band in, ``(B, C', h / s, W')`` band out."""
        if self.spatial.local:
            return super().forward(x)
        (k, _), (s, _), (p, pw), (d, _) = (_pair(v) for v in (self.kernel_size, self.stride, self.padding, self.dilation))
        if x.shape[2] % s:
            raise RuntimeError(f"spatial rank {self.spatial.rank}: a band of {x.shape[2]} rows under a stride-{s} conv")
        return _halo_convolve(
            x, self.spatial, k, s, p, d,
            lambda t: F.conv2d(t, self.weight, self.bias, self.stride, (p, pw), self.dilation, self.groups),
            lambda t: F.conv2d(t, self.weight, self.bias, self.stride, (0, pw), self.dilation, self.groups),
            lambda t: F.conv2d(t, self.weight, None, self.stride, (0, pw), self.dilation, self.groups),
        )


class HaloDepthwiseConv2d(DepthwiseConv2d):
    """The LRD's ``K x K`` depth-wise 'same' convolution over a band, with ``K // 2`` halo rows each side.

    The band runs through the same :func:`depthwise_conv2d` method as one rank, and the rows
    next to a neighbour gain the halo rows' part (see :func:`_halo_convolve`).
    Build with :meth:`from_depthwise`; ``spatial`` is the :class:`SpatialGroup`.
    """

    spatial: SpatialGroup

    @classmethod
    def from_depthwise(cls, conv: DepthwiseConv2d, group: SpatialGroup) -> "HaloDepthwiseConv2d":
        """The spatial version of ``conv``, holding its parameters."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        new.spatial = group
        return new

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, W) -> (B, C, h, W)``."""
        if self.spatial.local:
            return super().forward(x)
        halo = self.kernel_size // 2

        def inner(t: Tensor, bias: Tensor | None) -> Tensor:
            return depthwise_conv2d(t, self.weight, bias, self.method)[:, :, halo : t.shape[2] - halo]

        return _halo_convolve(
            x, self.spatial, self.kernel_size, 1, halo, 1,
            lambda t: depthwise_conv2d(t, self.weight, self.bias, self.method),
            lambda t: inner(t, self.bias),
            lambda t: inner(t, None),
        )


class SpatialResize(Resize):
    """Bilinear resizing (align_corners=False) of a band by an integer factor in height.

    Output row ``o`` of the scene reads input rows ``floor((o + 0.5) / f - 0.5)`` and the next,
    so each band takes one row from each neighbour, resamples the block by the same factor (the
    source coordinates shift by whole rows, so the weights are the scene's) and keeps its own rows.
    At the scene's edges the block ends where the scene does, which gives the same clamping.
    """

    def __init__(self, group: SpatialGroup) -> None:
        super().__init__()
        self.spatial = group

    def forward(self, x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """``(B, C, h, W)`` band to ``(B, C, size[0], size[1])``; ``size[0]`` a multiple of ``h``."""
        rows, width = int(size[0]), int(size[1])
        if rows == x.shape[2] or self.spatial.local:
            return super().forward(x, (rows, width))
        if rows % x.shape[2]:
            raise RuntimeError(
                f"spatial resize from {x.shape[2]} to {rows} rows: only whole-number upsampling is exchanged"
            )
        factor = rows // x.shape[2]
        block, missing_top, _ = halo_rows(x, self.spatial, 1, 1)
        out = super().forward(block, (block.shape[2] * factor, width))
        offset = (1 - missing_top) * factor
        return out[:, :, offset : offset + rows]
