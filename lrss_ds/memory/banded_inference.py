"""An eval-mode forward whose high-resolution layers and full-resolution logits run in row bands.

Why here, in the memory layer: this is the inference counterpart of the training levers beside
it (the banded stem, the banded loss). It changes how a model's layers are evaluated, never
what they compute, and it knows the models' structure (HRNet's stem and ``layer1``,
HRNet-FCN's concatenation head); the engine's predictor only streams the rows it is given.

In eval mode BatchNorm normalises with its running statistics, so every layer is a local
function of its input rows and a band of output rows needs only its input rows plus a halo
as wide as the banded part's receptive field: banding is exact up to float summation order.
Within :func:`banded_eval`:

* every HRNet's front -- the owning model's input transform (normalise, pad, pool), the stem
  (conv -> BN -> ReLU -> conv, the 64-channel half-resolution maps, run as
  :class:`~lrss_ds.memory.banded_stem.BandedStem`), ``layer1`` (four Bottlenecks, 256
  channels) and ``transition1`` -- runs in bands of input rows, each reading a halo of the
  chain's receptive field: only the two ``transition1`` branch maps (18 and 36 channels for
  W18) exist whole, never the normalised input, the stem's maps or ``layer1``'s 256 channels;
* HRNet-FCN's head (branches upsampled and concatenated, then a 1x1 conv-BN-ReLU-1x1 at
  stride 4) runs band by band, so neither the concatenation nor the hidden map exists whole;
* EHSNet's tail runs in one pass over bands of its LRD's output rows (each band builds its
  rows of the merged branches and reads a halo of the widest kernel): each band of ``F_in``
  goes through the main head, and through the auxiliary head and the ECR's first pass, then
  is dropped. The ECR's efficient attention normalises its keys over all positions and
  enhances the ``a`` fraction of least confident positions of the whole map, so it runs in
  two passes (:class:`StreamedECR`): the first accumulates the keys' per-channel maximum and
  sum of exponentials and the ``Ck x Cv`` key-value context band by band (an online softmax),
  and keeps the running ``n`` smallest top-2 margins with their feature vectors; the second
  applies the queries to those ``n`` positions and overwrites their logits. ``F_in``
  (``d`` channels at the output stride) never exists whole;
* a :class:`~lrss_ds.models.base.SegmentationModel` returns its logits at the output stride
  (``defer_upsampling``), and :class:`RowLogits` upsamples them to pixels a band of rows at a
  time with the losses' :func:`~lrss_ds.models.losses.upsample_rows`, which mirrors
  ``F.interpolate``'s bilinear kernel. The ``K x H x W`` logits never exist.

HRNet's stages 2-4 run whole on their branch maps (the four branches of W18 hold
18 + 36/4 + 72/16 + 144/64 = 34 channels' worth of the first branch's grid; EHSNet-W18 at a
2048 x 7300 slab peaked at 0.13 GiB of live tensors in them against 0.96 GiB in a band of its
LRD, counted by memory.device_sim's storage ledger);
so do GLNet/GLSNet's global branches and ResNet layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.memory.banded_stem import BandedStem
from lrss_ds.memory.large_conv import memory_format_of
from lrss_ds.models.base import SegmentationModel, run_directly
from lrss_ds.models.ecr import ECRModule
from lrss_ds.models.ehsnet import EHSNet
from lrss_ds.models.hrnet import HRNet
from lrss_ds.models.hrnet_fcn import HRNetFCN
from lrss_ds.models.large_kernel import DepthwiseConv2d
from lrss_ds.models.lrd import LRDModule
from lrss_ds.models.losses import upsample_rows

STEM_BAND_ROWS = 32
"""Half-resolution rows per band of the banded stem (its fastest band size, see BandedStem)."""

BAND_ROWS = 128
"""Output rows per band of ``layer1``, the LRD and the heads (at stride 4 or 8 of the input).

Each band recomputes its halo: EHSNet's LRD reads 15 rows on each side, so 128-row bands
compute (128 + 30) / 128 = 1.23x the LRD's rows, 64-row bands 1.47x."""

PIXEL_BAND_ROWS = 32
"""Full-resolution rows per band of upsampled logits: the upsampling makes about five
``K x rows x W`` float32 temporaries (24 classes x 32 rows x 7300 px: 22 MB each), while 512
rows made 1.8 GB of them."""


def receptive_radius(module: nn.Module) -> int:
    """Input rows on each side that one output row of ``module``'s convolutions can read.

    Walks the convolutions in registration order as if they were chained: each adds
    ``dilation * (kernel - 1) / 2`` times the stride accumulated so far. A residual block's
    shortcut convolution is counted as if chained too, which over-states the radius (a larger
    halo is still exact, only slower).

    Args:
        module: a stack of conv (``nn.Conv2d``, ``DepthwiseConv2d``)/BN/activation layers,
            possibly with shortcuts or parallel branches.

    Returns:
        the halo in input rows.
    """
    radius, jump = 0, 1
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            radius += layer.dilation[0] * (layer.kernel_size[0] - 1) // 2 * jump
            jump *= layer.stride[0]
        elif isinstance(layer, DepthwiseConv2d):  # stride 1, "same" padding
            radius += (layer.kernel_size - 1) // 2 * jump
    return radius


def _like_rows(band: Tensor, rows: int) -> Tensor:
    """An empty ``(B, C, rows, W)`` tensor with ``band``'s dtype, device and memory format."""
    shape = (*band.shape[:-2], rows, band.shape[-1])
    return torch.empty(shape, dtype=band.dtype, device=band.device, memory_format=memory_format_of(band))


def run_in_row_bands(fn: Callable[[Tensor], Tensor], x: Tensor, stride: int, halo: int, band_rows: int) -> Tensor:
    """``fn(x)`` computed band by band of its output rows, each band reading its input rows plus ``halo``.

    Exact when ``fn`` is local with a receptive radius <= ``halo`` input rows, zero-pads its
    convolutions, and maps input rows to output rows by ``stride``: band starts are multiples of
    ``stride``, so each band sees the same sampling grid and, at the image's top and bottom,
    the same padding as the whole map.

    Args:
        fn: ``(B, C, h, W) -> (B, C', ceil(h / stride), W')``.
        x: ``(B, C, H, W)``.
        stride: the row stride of ``fn``.
        halo: input rows read above and below each band.
        band_rows: output rows per band.

    Returns:
        ``fn(x)``, ``(B, C', ceil(H / stride), W')``, in ``fn``'s memory format.
    """
    return rows_in_bands(lambda lo, hi: fn(x[..., lo:hi, :]), x.shape[-2], stride, halo, band_rows)


def rows_in_bands(compute: Callable[[int, int], Tensor], height: int, stride: int, halo: int,
                  band_rows: int) -> Tensor:
    """:func:`run_in_row_bands` for a computation given as ``compute(lo, hi)`` on input rows ``[lo, hi)``.

    Args:
        compute: the banded computation on input rows ``[lo, hi)`` of a ``height``-row map.
        height: input rows.
        stride, halo, band_rows: as for :func:`run_in_row_bands`.

    Returns:
        the output of all ``height`` rows.
    """
    out_rows = -(-height // stride)
    if out_rows <= band_rows:
        return compute(0, height)
    out: Tensor | None = None
    for first in range(0, out_rows, band_rows):
        last = min(first + band_rows, out_rows)
        lo = max(0, first * stride - halo)
        lo -= lo % stride
        hi = min(height, last * stride + halo)
        band = compute(lo, hi)
        if out is None:
            out = _like_rows(band, out_rows)
        offset = lo // stride
        out[..., first:last, :] = band[..., first - offset : last - offset, :]
    assert out is not None
    return out


def _branch_rows(features: Sequence[Tensor], lo: int, hi: int) -> list[Tensor]:
    """Rows ``[lo, hi)`` of the first branch's size of every branch (the others upsampled bilinearly,
    ``align_corners=False``, as ``concat_branches``), each computed from the rows it reads."""
    size = tuple(features[0].shape[-2:])
    return [features[0][..., lo:hi, :]] + [upsample_rows(f, size, size, lo, hi) for f in features[1:]]


def concat_head_in_bands(head: nn.Module, features: list[Tensor], band_rows: int) -> Tensor:
    """``head(concat_branches(features))`` one band of the first branch's rows at a time.

    Each band concatenates the first branch's rows with the same rows of the other branches
    upsampled bilinearly (``align_corners=False``, as ``concat_branches``), computed from the
    low-resolution rows they interpolate from; ``head`` must be per-pixel (1x1 convolutions).

    Args:
        head: per-pixel head, ``(B, sum c_i, r, w) -> (B, K, r, w)``.
        features: ``[(B, c_i, h / 2^i, w / 2^i)]``.
        band_rows: rows of the first branch per band.

    Returns:
        ``(B, K, h, w)``.
    """
    size = tuple(features[0].shape[-2:])
    out: Tensor | None = None
    for first in range(0, size[0], band_rows):
        last = min(first + band_rows, size[0])
        band = head(torch.cat(_branch_rows(features, first, last), dim=1))
        if out is None:
            out = _like_rows(band, size[0])
        out[..., first:last, :] = band
    assert out is not None
    return out


def multi_rows_in_bands(compute: Callable[[int, int], Sequence[Tensor]], height: int, strides: Sequence[int],
                        halo: int, band_rows: int) -> list[Tensor]:
    """Outputs at several row strides of a local computation on input rows ``[lo, hi)``, band by band.

    Band starts are multiples of ``band_rows``; ``halo`` and ``band_rows`` must be multiples of
    every stride (so each band reads its input from a row on every output's sampling grid), and
    ``halo`` at least the computation's receptive radius in input rows.

    Args:
        compute: ``compute(lo, hi)`` -> one map per stride, ``(B, C_i, ceil((hi - lo) / s_i), W_i)``.
        height: input rows.
        strides: each output's row stride.
        halo: input rows read above and below each band.
        band_rows: input rows each band owns.

    Returns:
        every output of all ``height`` rows, ``(B, C_i, ceil(height / s_i), W_i)``.
    """
    outs: list[Tensor] = []
    for first in range(0, height, band_rows):
        last = min(first + band_rows, height)
        lo, hi = max(0, first - halo), min(height, last + halo)
        bands = compute(lo, hi)
        if not outs:
            outs = [_like_rows(band, -(-height // s)) for band, s in zip(bands, strides)]
        for out, band, s in zip(outs, bands, strides):
            a, b = first // s, -(-last // s)
            out[..., a:b, :] = band[..., a - lo // s : b - lo // s, :]
    return outs


FRONT_BAND_ROWS = 512
"""Rows of the stem's input per band of an HRNet's front (stem, ``layer1``, ``transition1``).

The front's halo is 39 input rows at output stride 8 (48 once aligned to the 16-row grid of
``transition1``'s second branch), so 512-row bands compute 1.19x its rows."""


def _front_halo(backbone: HRNet) -> int:
    """Rows of the stem's input that one output row of ``transition1`` reads on each side.

    Counted along the chain: the stem's two convolutions, each Bottleneck's 3x3 (its 1x1
    shortcut reads no neighbours), then the wider of ``transition1``'s branches.
    """
    radius, jump = 0, 1
    for conv in [backbone.conv1, backbone.conv2, *[block.conv2 for block in backbone.layer1]]:
        radius += conv.dilation[0] * (conv.kernel_size[0] - 1) // 2 * jump
        jump *= conv.stride[0]
    return radius + jump * max(receptive_radius(layer) for layer in backbone.transition1 if layer is not None)


@dataclass
class BandedFront:
    """An HRNet's front (stem, ``layer1``, ``transition1``) computed in bands of its input rows.

    Attributes:
        forward: ``forward(x, input_transform)`` -> ``transition1``'s two branch maps.
        halo: rows of the raw input each band reads above and below its own.
        strides: the two branch maps' row strides relative to the raw input.
    """

    forward: Callable[..., list[Tensor]]
    halo: int
    strides: list[int]


def banded_front(backbone: HRNet, transform_stride: int, band_rows: int, front_rows: int) -> BandedFront:
    """The front of ``backbone`` run in bands of input rows (see the module docstring).

    Args:
        backbone: the HRNet.
        transform_stride: rows of the raw input per row of the input transform's output (the
            owning model's ``pad_multiple / total_stride``: 1, or HRNet-FCN's ``downsample``).
            The transform must be row-local: it normalises, pads the bottom and right with
            zeros to a multiple of ``pad_multiple`` and pools ``transform_stride`` rows into one.
        band_rows: output rows per band of ``layer1`` within a front band.
        front_rows: rows of the stem's input per front band.
    """
    t = transform_stride
    pad_multiple = t * backbone.total_stride
    strides = [t * backbone.output_stride, 2 * t * backbone.output_stride]  # transition1's two branches
    align = strides[-1]
    halo = t * _front_halo(backbone)
    halo += -halo % align
    front_rows = max(align, (t * front_rows) // align * align)
    layer1_stride = backbone.output_stride // 4
    layer1_halo = receptive_radius(backbone.layer1)
    layer1_halo += -layer1_halo % layer1_stride

    def forward(x: Tensor, input_transform: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        height = x.shape[-2]
        padded = -(-height // pad_multiple) * pad_multiple

        def front(lo: int, hi: int) -> list[Tensor]:
            # the transform of raw rows [lo, hi); the rows past the input are its zero padding
            stop, rows = min(hi, height), (hi - lo) // t
            if stop > lo:
                raw = x[..., lo:stop, :]
                z = (raw if input_transform is None else input_transform(raw))[..., :rows, :]
            else:  # a band wholly in the padding: only the transform's channels and width are needed
                raw = x[..., :t, :]
                z = (raw if input_transform is None else input_transform(raw))[..., :0, :]
            if z.shape[-2] < rows:
                z = F.pad(z, (0, 0, 0, rows - z.shape[-2]))
            stem = backbone._stem(z, None)
            y = run_in_row_bands(backbone._layer1, stem, layer1_stride, layer1_halo, band_rows)
            return backbone.run_transition(1, y)

        return multi_rows_in_bands(front, padded, strides, halo, front_rows)

    return BandedFront(forward, halo, strides)


def _hrnet_banding(backbone: HRNet, transform_stride: int, band_rows: int,
                   front_rows: int) -> Callable[..., list[Tensor]]:
    """An eval forward for ``backbone`` whose front runs in bands of input rows (:func:`banded_front`)."""
    front = banded_front(backbone, transform_stride, band_rows, front_rows)

    def forward(x: Tensor, input_transform: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        return backbone.after_front(*front.forward(x, input_transform))

    return forward


class StreamedECR:
    """EHSNet's ECR in eval mode, fed band by band: first pass accumulates, :meth:`finish` applies.

    The unbanded module (:class:`~lrss_ds.models.ecr.ECRModule`) selects the ``n`` positions of
    the smallest top-2 margin of the auxiliary logits, and enhances them by efficient attention
    whose keys are normalised over *all* positions (a softmax per key channel). Both are
    scene-wide, and both stream:

    * the key softmax and its context ``sum_p softmax(k)[p, c] v[p, :]`` are the online
      softmax: per key channel a running maximum ``m`` and ``s = sum exp(k - m)``, and the
      unnormalised context ``sum exp(k - m) v``, rescaled by ``exp(m_old - m_new)`` when a band
      raises the maximum (accumulated in float64; the bands are summed in another order than
      the whole map, so results agree to float rounding);
    * the hard set is the running ``n`` smallest margins with their flat positions and ``F_in``
      vectors (``n x C`` values: 10 % of the positions); ties at the threshold may resolve
      differently than one ``topk`` over the whole map, as ``topk``'s own order of ties is
      unspecified.

    Args:
        ecr: the module (its projections and ``hard_ratio``).
        valid: ``(hv, wv)``, the positions the ECR runs on (those covering the input).
    """

    def __init__(self, ecr: ECRModule, valid: tuple[int, int]) -> None:
        self.ecr, self.valid = ecr, valid
        self.n = ecr.num_hard(valid[0] * valid[1])
        self.margin: Tensor | None = None  # (B, <= n) float32
        self.index: Tensor | None = None  # (B, <= n) long, flat positions in hv x wv
        self.hard: Tensor | None = None  # (B, C, <= n) F_in vectors
        self.key_max: Tensor | None = None  # (B, Ck) float64
        self.key_sum: Tensor | None = None  # (B, Ck) float64
        self.context: Tensor | None = None  # (B, Ck, Cv) float64, unnormalised
        self.value_dtype = torch.float32

    def add(self, features: Tensor, aux_logits: Tensor, first: int) -> None:
        """Take rows ``first..`` of the valid region: ``features (B, C, r, wv)``, ``aux_logits (B, K, r, wv)``."""
        top2 = aux_logits.float().topk(2, dim=1).values
        margin = (top2[:, 0] - top2[:, 1]).flatten(1)  # (B, r * wv)
        flat = features.flatten(2)  # (B, C, r * wv)
        index = torch.arange(first * self.valid[1], first * self.valid[1] + margin.shape[1], device=margin.device)
        index = index.expand(margin.shape[0], -1)
        if self.margin is not None:
            assert self.index is not None and self.hard is not None
            margin, index = torch.cat([self.margin, margin], 1), torch.cat([self.index, index], 1)
            flat = torch.cat([self.hard, flat], 2)
        keep = margin.topk(min(self.n, margin.shape[1]), dim=1, largest=False, sorted=False).indices
        self.margin, self.index = margin.gather(1, keep), index.gather(1, keep)
        self.hard = flat.gather(2, keep.unsqueeze(1).expand(-1, flat.shape[1], -1))

        values = self.ecr.value(features).flatten(2)  # (B, Cv, N)
        self.value_dtype = values.dtype
        compute = torch.promote_types(values.dtype, torch.float32)
        keys = self.ecr.key(features).flatten(2).to(compute)  # (B, Ck, N)
        band_max = keys.amax(dim=-1).double()
        new_max = band_max if self.key_max is None else torch.maximum(self.key_max, band_max)
        weights = (keys - new_max.to(compute).unsqueeze(-1)).exp_()
        band_context = (weights @ values.to(compute).transpose(1, 2)).double()  # (B, Ck, Cv)
        band_sum = weights.sum(dim=-1).double()
        if self.key_max is None:
            self.key_sum, self.context = band_sum, band_context
        else:
            assert self.key_sum is not None and self.context is not None
            rescale = (self.key_max - new_max).exp()
            self.key_sum = self.key_sum * rescale + band_sum
            self.context = self.context * rescale.unsqueeze(-1) + band_context
        self.key_max = new_max

    def finish(self) -> tuple[Tensor, Tensor]:
        """The hard positions and their enhanced features.

        Returns:
            ``(index (B, n) long`` flat positions in ``hv x wv``, ``enhanced (B, C, n)`` in
            the features' dtype).
        """
        assert self.hard is not None and self.index is not None
        assert self.context is not None and self.key_sum is not None
        hard = self.hard.transpose(1, 2)  # (B, n, C)
        queries = self.ecr.query(hard)  # (B, n, Ck)
        compute = torch.promote_types(self.value_dtype, torch.float32)
        context = (self.context / self.key_sum.unsqueeze(-1)).to(compute)  # softmax_pos(k)^T v
        heads = self.ecr.heads
        batch, n, key_channels = queries.shape
        q = queries.to(compute).view(batch, n, heads, key_channels // heads).softmax(dim=-1).view(batch, n, -1)
        if heads > 1:  # each head's queries read only its own block of keys and values
            value_channels = context.shape[-1]
            blocks = torch.block_diag(*[torch.ones(key_channels // heads, value_channels // heads)] * heads)
            context = context * blocks.to(context)
        attended = (q @ context).to(self.value_dtype)  # (B, n, Cv)
        enhanced = hard + self.ecr.reproject(attended)
        return self.index, enhanced.transpose(1, 2).to(hard.dtype)


def _ehsnet_banding(model: EHSNet, band_rows: int) -> Callable[[Tensor], Any]:
    """An eval forward for EHSNet: the banded backbone, then the tail in one pass of bands (module docstring)."""
    lrd = model.lrd
    if isinstance(lrd, LRDModule):
        # reduce and increase are 1x1 and the unit's branches run side by side, each a single
        # "same" convolution: the widest kernel sets the reach (receptive_radius would add them up)
        halo = max(receptive_radius(conv) for conv in lrd.modules() if isinstance(conv, (nn.Conv2d, DepthwiseConv2d)))

        def f_in(features: Sequence[Tensor], lo: int, hi: int) -> Tensor:
            return LRDModule.forward(lrd, *_branch_rows(features, lo, hi), merge=lambda *maps: torch.cat(maps, dim=1))
    else:
        halo = receptive_radius(lrd)

        def f_in(features: Sequence[Tensor], lo: int, hi: int) -> Tensor:
            return lrd(torch.cat(_branch_rows(features, lo, hi), dim=1))

    def forward(x: Tensor) -> Any:
        input_size, padded = model.sizes(x)
        features = model.backbone(x, input_transform=model.prepare_input)
        height = features[0].shape[-2]
        valid = (-(-input_size[0] // model.output_stride), -(-input_size[1] // model.output_stride))
        ecr = StreamedECR(model.ecr, valid) if model.ecr is not None else None
        logits: Tensor | None = None
        for first in range(0, height, band_rows):
            last = min(first + band_rows, height)
            lo = max(0, first - halo)
            band = f_in(features, lo, min(height, last + halo))[..., first - lo : last - lo, :]
            out = model.head(band)
            if logits is None:
                logits = _like_rows(out, height)
            logits[..., first:last, :] = out
            if ecr is not None and first < valid[0]:
                inner = band[..., : min(last, valid[0]) - first, : valid[1]]
                ecr.add(inner, model.aux_head(inner), first)
        assert logits is not None
        if ecr is not None:
            index, enhanced = ecr.finish()
            hard_logits = model.head(enhanced.unsqueeze(-1))[..., 0]  # (B, K, n)
            for b in range(logits.shape[0]):
                logits[b, :, index[b] // valid[1], index[b] % valid[1]] = hard_logits[b]
        return model.outputs(logits, [], input_size, padded)

    return forward


class _BandingRunner:
    """A segment runner that bands the named segments and passes the others to the previous runner."""

    def __init__(self, previous: Callable[..., Any], banded: dict[str, Callable[..., Any]]) -> None:
        self.previous, self.banded = previous, banded

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if name in self.banded:
            return self.banded[name](fn, *args)
        return self.previous(name, fn, *args)


def _head_banding(model: HRNetFCN, band_rows: int) -> Callable[..., Tensor]:
    def banded(fn: Callable[..., Tensor], *features: Tensor) -> Tensor:
        return concat_head_in_bands(model.head, list(features), band_rows)

    return banded


@contextlib.contextmanager
def banded_eval(model: nn.Module, band_rows: int | None = None, stem_band_rows: int | None = None,
                front_band_rows: int | None = None) -> Iterator[None]:
    """Run ``model``'s eval forward with its high-resolution layers in row bands (see the module docstring).

    Inside the context a :class:`SegmentationModel` returns its train-mode dict (logits at the
    output stride); wrap it with :func:`row_logits`. Other modules are left as they are.
    Everything is put back on exit.

    Args:
        model: an eval-mode model.
        band_rows: output rows per band of ``layer1`` (within a band of the front), of
            EHSNet's tail and of the HRNet-FCN head (None: :data:`BAND_ROWS`).
        stem_band_rows: half-resolution rows per band of the stems (None: :data:`STEM_BAND_ROWS`).
        front_band_rows: rows of the stem's input per band of the HRNet fronts (None:
            :data:`FRONT_BAND_ROWS`; rounded to a multiple of ``transition1``'s coarser stride).

    Raises:
        RuntimeError: ``model`` is in train mode (BatchNorm would use batch statistics,
            which bands cannot reproduce).
    """
    if model.training:
        raise RuntimeError("banded_eval needs an eval-mode model; call model.eval() first")
    band_rows = BAND_ROWS if band_rows is None else band_rows
    stem_band_rows = STEM_BAND_ROWS if stem_band_rows is None else stem_band_rows
    front_band_rows = FRONT_BAND_ROWS if front_band_rows is None else front_band_rows
    restore: list[Callable[[], None]] = []

    def replace(module: nn.Module, name: str, value: Any) -> None:
        if name == "forward":  # an instance attribute over the class's method
            restore.append(lambda: delattr(module, "forward"))
        else:
            restore.append(lambda old=getattr(module, name, None): setattr(module, name, old))
        setattr(module, name, value)

    # the input transform's row stride of every HRNet owned by a model (HRNet-FCN pools)
    transform_strides = {id(m.backbone): m.pad_multiple // m.backbone.total_stride for m in model.modules()
                         if isinstance(m, SegmentationModel) and isinstance(getattr(m, "backbone", None), HRNet)}
    try:
        for module in model.modules():
            if isinstance(module, HRNet):
                if BandedStem.supports(module.conv1, module.bn1, module.conv2):
                    replace(module, "stem_core", BandedStem(stem_band_rows))
                replace(module, "forward", _hrnet_banding(module, transform_strides.get(id(module), 1), band_rows,
                                                         front_band_rows))
            if isinstance(module, HRNetFCN):
                runner = _BandingRunner(getattr(module, "_segment_runner", run_directly), {module.segment_prefix + "head": _head_banding(module, band_rows)})
                replace(module, "_segment_runner", runner)
            if isinstance(module, EHSNet):
                replace(module, "forward", _ehsnet_banding(module, band_rows))
            if isinstance(module, SegmentationModel):
                replace(module, "defer_upsampling", True)
        yield
    finally:
        for undo in reversed(restore):
            undo()


@dataclass
class RowLogits:
    """Logits at the network's resolution, upsampled to pixels a band of rows at a time.

    Attributes:
        logits: ``(B, K, h, w)`` float32 at the output stride (or already ``(B, K, H, W)``).
        padded: ``(Hp, Wp)``, the padded size the network saw.
        input_size: ``(H, W)``.
    """

    logits: Tensor
    padded: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def num_classes(self) -> int:
        """K."""
        return int(self.logits.shape[1])

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the full-resolution logits, ``(B, K, stop - start, W)`` float32."""
        return upsample_rows(self.logits, self.padded, self.input_size, start, stop)


def row_logits(outputs: Tensor | dict[str, Any]) -> RowLogits:
    """Wrap what a model returned inside :func:`banded_eval`.

    Args:
        outputs: a :class:`SegmentationModel`'s dict (``logits``, ``padded_size``,
            ``input_size``), or full-resolution logits ``(B, K, H, W)`` from any other module
            (these are then only sliced).

    Returns:
        the logits as float32 :class:`RowLogits`.
    """
    if isinstance(outputs, dict):
        size = tuple(int(v) for v in outputs["input_size"])
        padded = tuple(int(v) for v in outputs["padded_size"])
        return RowLogits(outputs["logits"].float(), padded, size)  # type: ignore[arg-type]
    size = (int(outputs.shape[-2]), int(outputs.shape[-1]))
    return RowLogits(outputs.float(), size, size)


__all__ = ["BAND_ROWS", "FRONT_BAND_ROWS", "PIXEL_BAND_ROWS", "BandedFront", "RowLogits", "StreamedECR", "banded_eval",
           "banded_front", "concat_head_in_bands", "multi_rows_in_bands", "receptive_radius", "row_logits",
           "run_in_row_bands"]
