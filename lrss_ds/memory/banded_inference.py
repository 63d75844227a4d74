"""An eval-mode forward whose high-resolution layers and full-resolution logits run in row bands.

Why here, in the memory layer: this is the inference counterpart of the training levers beside
it (the banded stem, the banded loss). It changes how a model's layers are evaluated, never
what they compute, and it knows the models' structure (HRNet's stem and ``layer1``,
HRNet-FCN's concatenation head); the engine's predictor only streams the rows it is given.

In eval mode BatchNorm normalises with its running statistics, so every layer is a local
function of its input rows and a band of output rows needs only its input rows plus a halo
as wide as the banded part's receptive field: banding is exact up to float summation order.
Within :func:`banded_eval`:

* every HRNet stem (conv -> BN -> ReLU -> conv, the 64-channel half-resolution maps) runs as
  :class:`~lrss_ds.memory.banded_stem.BandedStem`, which in eval mode uses the running
  statistics;
* every HRNet ``layer1`` (four Bottlenecks at stride 4, 256 channels) runs in bands of its
  output rows, each reading its input rows with a halo of the blocks' receptive field;
* HRNet-FCN's head (branches upsampled and concatenated, then a 1x1 conv-BN-ReLU-1x1 at
  stride 4) runs band by band, so neither the concatenation nor the hidden map exists whole;
* EHSNet's LRD module (branches upsampled and concatenated, 1x1, the large-kernel unit, 1x1)
  runs band by band with a halo of its widest kernel, and its two heads in row bands;
* a :class:`~lrss_ds.models.base.SegmentationModel` returns its logits at the output stride
  (``defer_upsampling``), and :class:`RowLogits` upsamples them to pixels a band of rows at a
  time with the losses' :func:`~lrss_ds.models.losses.upsample_rows`, which mirrors
  ``F.interpolate``'s bilinear kernel. The ``K x H x W`` logits never exist.

Layers with a scene-wide view (HRNet's later stages, EHSNet's ECR, GLNet/GLSNet's global
branches) run whole at their own, lower, resolution; so do GLNet/GLSNet's ResNet layers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from lrss_ds.memory.banded_stem import BandedStem
from lrss_ds.memory.large_conv import memory_format_of
from lrss_ds.models.base import SegmentationModel, run_directly
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


class _BandingRunner:
    """A segment runner that bands the named segments and passes the others to the previous runner."""

    def __init__(self, previous: Callable[..., Any], banded: dict[str, Callable[..., Any]]) -> None:
        self.previous, self.banded = previous, banded

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if name in self.banded:
            return self.banded[name](fn, *args)
        return self.previous(name, fn, *args)


def _layer1_banding(backbone: HRNet, band_rows: int) -> Callable[..., Tensor]:
    stride = backbone.output_stride // 4
    halo = receptive_radius(backbone.layer1)
    halo += -halo % stride  # whole strides, so band starts stay on the sampling grid

    def banded(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return run_in_row_bands(fn, x, stride, halo, band_rows)

    return banded


def _per_band(head: nn.Module, band_rows: int) -> Callable[..., Tensor]:
    """Run a local head segment (``fn(x)``, stride 1) in row bands with its receptive halo."""
    halo = receptive_radius(head)

    def banded(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        return run_in_row_bands(fn, x, 1, halo, band_rows)

    return banded


def _lrd_banding(lrd: LRDModule, band_rows: int) -> Callable[..., Tensor]:
    """A forward for EHSNet's LRD module that merges the branches and runs the module band by band.

    EHSNet calls the LRD with ``merge`` = upsample + concatenate the HRNet branches
    (``concat_branches``); each band builds those rows of the merged map itself.
    """
    original = lrd.forward
    # reduce and increase are 1x1 and the unit's branches run side by side, each a single
    # "same" convolution: the widest kernel sets the reach (receptive_radius would add them up)
    halo = max(receptive_radius(branch) for branch in lrd.modules()
               if isinstance(branch, (nn.Conv2d, DepthwiseConv2d)))

    def banded(*features: Tensor, merge: Callable[..., Tensor] | None = None) -> Tensor:
        if merge is None:
            return rows_in_bands(lambda lo, hi: original(features[0][..., lo:hi, :]), features[0].shape[-2], 1,
                                 halo, band_rows)

        def on_rows(lo: int, hi: int) -> Tensor:
            return original(*_branch_rows(features, lo, hi), merge=lambda *maps: torch.cat(maps, dim=1))

        return rows_in_bands(on_rows, features[0].shape[-2], 1, halo, band_rows)

    return banded


def _head_banding(model: HRNetFCN, band_rows: int) -> Callable[..., Tensor]:
    def banded(fn: Callable[..., Tensor], *features: Tensor) -> Tensor:
        return concat_head_in_bands(model.head, list(features), band_rows)

    return banded


@contextlib.contextmanager
def banded_eval(model: nn.Module, band_rows: int | None = None, stem_band_rows: int | None = None) -> Iterator[None]:
    """Run ``model``'s eval forward with its high-resolution layers in row bands (see the module docstring).

    Inside the context a :class:`SegmentationModel` returns its train-mode dict (logits at the
    output stride); wrap it with :func:`row_logits`. Other modules are left as they are.
    Everything is put back on exit.

    Args:
        model: an eval-mode model.
        band_rows: output rows per band of ``layer1`` and of the HRNet-FCN head (None:
            :data:`BAND_ROWS`).
        stem_band_rows: half-resolution rows per band of the stems (None: :data:`STEM_BAND_ROWS`).

    Raises:
        RuntimeError: ``model`` is in train mode (BatchNorm would use batch statistics,
            which bands cannot reproduce).
    """
    if model.training:
        raise RuntimeError("banded_eval needs an eval-mode model; call model.eval() first")
    band_rows = BAND_ROWS if band_rows is None else band_rows
    stem_band_rows = STEM_BAND_ROWS if stem_band_rows is None else stem_band_rows
    restore: list[Callable[[], None]] = []
    try:
        for module in model.modules():
            if isinstance(module, HRNet):
                if BandedStem.supports(module.conv1, module.bn1, module.conv2):
                    restore.append(lambda m=module, core=module.stem_core: setattr(m, "stem_core", core))
                    module.stem_core = BandedStem(stem_band_rows)
                banded = {module.segment_prefix + "layer1": _layer1_banding(module, band_rows)}
            elif isinstance(module, HRNetFCN):
                banded = {module.segment_prefix + "head": _head_banding(module, band_rows)}
            elif isinstance(module, EHSNet):
                banded = {module.segment_prefix + name: _per_band(getattr(module, name), band_rows)
                          for name in ("aux_head", "head")}
            else:
                banded = {}
            if banded:
                previous = getattr(module, "_segment_runner", run_directly)
                restore.append(lambda m=module, r=previous: setattr(m, "_segment_runner", r))
                module._segment_runner = _BandingRunner(previous, banded)
            if isinstance(module, LRDModule):
                restore.append(lambda m=module: delattr(m, "forward"))
                module.forward = _lrd_banding(module, band_rows)  # type: ignore[method-assign]
            if isinstance(module, SegmentationModel):
                restore.append(lambda m=module, d=module.defer_upsampling: setattr(m, "defer_upsampling", d))
                module.defer_upsampling = True
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


__all__ = ["BAND_ROWS", "PIXEL_BAND_ROWS", "RowLogits", "banded_eval", "concat_head_in_bands", "receptive_radius", "row_logits",
           "run_in_row_bands"]
