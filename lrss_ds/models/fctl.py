"""FCtL: each local patch correlated with medium and large context crops centred on it.

Li, Yang, Liu, Yu & He, "From Contexts to Locality: Ultra-high Resolution Image Segmentation
via Locality-aware Contextual Correlation", ICCV 2021 (a row of EHSNet's Tables 1-3).
Composition, per crop of the image::

    encoder      : ResNet on the crop, on the medium context (``medium_context`` crops wide,
                   centred on it) and on the large context (``large_context`` crops wide),
                   each resampled to the crop's size
    reduce       : 1x1 conv-BN-ReLU of each view's deepest map (stride 32) to ``corr_width``
    correlations : three ContextCorrelation blocks, queries always from the local map:
                   local-local, local-medium, local-large
    fusion       : AdaptiveFusion: per-pixel, per-channel weights over the three (softmax over
                   the views of sigmoid gates), added to the local map
    decoder      : GLNet's FPN (:class:`lrss_ds.models.glnet.FPN`) on the local c2..c4 and
                   the fused stride-32 map -> logits at stride 4

A correlation block is, with Q, K 1x1 convolutions to ``key_width`` and V a 1x1 convolution
(no bias) on the context map ``y``::

    out = x + gamma * softmax_rows(Q(x)^T K(y)) V(y)^T      (no 1/sqrt(d) scale, as released)

The queries come from the local patch and the keys and values from its context, so the
result stays on the patch's own grid: that is the "locality" of the correlation; the
adaptive fusion lets each position weigh its contexts (the release's ``in``/``trans``/``out``
1x1 convolutions: three inputs, one joint 1x1 over their concatenation, three sigmoid gates,
softmax across the views).

Where the paper is vague, or we differ, and why:

* **Contexts.** Context windows of ``medium_context`` (2) and ``large_context`` (3) crop
  sides, centred on the crop (the released code's context factors 2 and 3, which pad the
  image by half a crop and a crop); outside the image they are zero after normalisation (the
  band mean), as the released code pads with black. Its final model takes the large view from
  the whole image downsampled; we keep the centred crop (the paper's "large context").
* **One encoder, one stage.** The release trains in stages with separate VGG-16 FCN-8s
  encoders, the context ones frozen. Here one ResNet (``depth``, 50 by default) encodes all
  three views and everything trains jointly; the decoder is an FPN rather than FCN-8s (the
  project's GLNet FPN; FCN-8s needs VGG's 100 px input padding).
* **Correlation width.** ResNet-50's stride-32 map has 2048 channels; it is reduced to
  ``corr_width`` (512, VGG's pool5 width) before correlating, so the three blocks and the
  fusion have the release's sizes.
* **gamma** starts at 0.1, not 0: at 0 the attention's Q/K/V get no gradient until gamma has
  moved; 0.1 with N(0, 0.01) weights adds ~1e-3 of the values at the start.
* **The contextual semantics refinement network** the paper describes for merging patch
  results is not in the released code and not built; crops do not overlap (the release
  overlaps them by >= 50 px and averages), so the result is stitched as GLNet's is.

Outputs: main logits at stride 4 of the padded image (the crops stitched); no aux.

BatchNorm in train mode normalises each chunk of ``crop_batch`` crops with that chunk's
statistics, so train-mode outputs depend on ``crop_batch``; eval-mode outputs do not.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, refuse_unknown_options
from lrss_ds.models.glnet import FPN
from lrss_ds.models.tiling import TILE_MULTIPLE, Tiling, plan_tiling, stitch
from lrss_ds.models.multiscale import Window, cut_windows, window_transform
from lrss_ds.models.resnet import LAYOUTS, ResNet

GAMMA_INIT = 0.1
"""Start value of each correlation's output scale (see the module docstring)."""


def context_window(window: Window, factor: int) -> Window:
    """The window ``factor`` times as wide and high as ``window``, centred on it.

    Args:
        window: ``(r0, c0, h, w)``.
        factor: >= 1; ``(factor - 1) * h`` and ``(factor - 1) * w`` must be even.

    Returns:
        ``(r0 - (factor - 1) h / 2, c0 - (factor - 1) w / 2, factor h, factor w)``.
    """
    r0, c0, h, w = window
    return r0 - (factor - 1) * h // 2, c0 - (factor - 1) * w // 2, factor * h, factor * w


def _conv1x1(c_in: int, c_out: int, bias: bool = True) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 1, bias=bias)
    nn.init.normal_(conv.weight, std=0.01)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


class ContextCorrelation(nn.Module):
    """``x + gamma * attention(queries from x, keys and values from y)`` on feature maps.

    Args:
        channels: channels of ``x`` and ``y`` (and of the values).
        key_width: channels of queries and keys.
    """

    def __init__(self, channels: int, key_width: int) -> None:
        super().__init__()
        self.query = _conv1x1(channels, key_width)
        self.key = _conv1x1(channels, key_width)
        self.value = _conv1x1(channels, channels, bias=False)
        self.gamma = nn.Parameter(torch.full((1,), GAMMA_INIT))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Correlate the local map with a context map.

        Args:
            x: ``(N, C, h, w)`` local features (queries, residual).
            y: ``(N, C, h', w')`` context features (keys, values).

        Returns:
            ``(N, C, h, w)``.
        """
        n, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (N, hw, d)
        k = self.key(y).flatten(2).transpose(1, 2)  # (N, h'w', d)
        v = self.value(y).flatten(2).transpose(1, 2)  # (N, h'w', C)
        attended = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), scale=1.0)
        return x + self.gamma * attended.squeeze(1).transpose(1, 2).reshape(n, c, h, w)


class AdaptiveFusion(nn.Module):
    """Per-pixel, per-channel weights over several correlated maps, softmax across them.

    Args:
        channels: channels of each map.
        views: number of maps (3: local, medium, large).
    """

    def __init__(self, channels: int, views: int = 3) -> None:
        super().__init__()
        self.views = views
        self.inputs = nn.ModuleList([_conv1x1(channels, channels) for _ in range(views)])
        self.joint = _conv1x1(channels * views, channels * views)
        self.gates = nn.ModuleList([_conv1x1(channels, channels) for _ in range(views)])

    def forward(self, maps: list[Tensor]) -> Tensor:
        """``[(N, C, h, w)] * views -> (N, C, h, w)``, the weighted sum of the maps."""
        joint = self.joint(torch.cat([layer(m) for layer, m in zip(self.inputs, maps)], dim=1))
        parts = joint.chunk(self.views, dim=1)
        gates = torch.stack([torch.sigmoid(g(p)) for g, p in zip(self.gates, parts)]).softmax(dim=0)
        return sum(weight * m for weight, m in zip(gates.unbind(0), maps))


class FCtL(SegmentationModel):
    """FCtL with an FPN decoder and one shared encoder (see the module docstring).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean for the normaliser (raw units), ``None`` = 0.
        band_std: per-band std, ``None`` = 1.
        crop_size: largest local crop side in pixels, a multiple of 32 (default 512).
        medium_context: medium context side in crop sides (2).
        large_context: large context side in crop sides (3).
        depth: ResNet depth of the encoder (50).
        fpn_width: FPN width (256).
        corr_width: channels correlated at stride 32 (512).
        key_width: channels of the correlations' queries and keys (512, as released).
        crop_batch: crops (each with its two contexts) run together (default 4).

    Raises:
        ConfigError: for an option out of range.
    """

    name = "fctl"
    output_stride = 4

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        crop_size: int = 512,
        medium_context: int = 2,
        large_context: int = 3,
        depth: int = 50,
        fpn_width: int = 256,
        corr_width: int = 512,
        key_width: int = 512,
        crop_batch: int = 4,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            band_mean,
            band_std,
            crop_size=crop_size,
            medium_context=medium_context,
            large_context=large_context,
            depth=depth,
            fpn_width=fpn_width,
            corr_width=corr_width,
            key_width=key_width,
            crop_batch=crop_batch,
        )
        if crop_size < TILE_MULTIPLE or crop_size % TILE_MULTIPLE:
            raise ConfigError("crop_size", f"must be a positive multiple of {TILE_MULTIPLE}, got {crop_size}")
        for key, value in (("medium_context", medium_context), ("large_context", large_context)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(key, f"must be an integer >= 1 (crop sides), got {value!r}")
        if depth not in LAYOUTS:
            raise ConfigError("depth", f"must be one of {sorted(LAYOUTS)}, got {depth}")
        if fpn_width < 2 or fpn_width % 2:
            raise ConfigError("fpn_width", f"must be an even number >= 2, got {fpn_width}")
        for key, value in (("corr_width", corr_width), ("key_width", key_width), ("crop_batch", crop_batch)):
            if value < 1:
                raise ConfigError(key, f"must be >= 1, got {value}")
        self.crop_size = crop_size
        self.contexts = (medium_context, large_context)
        self.crop_batch = crop_batch
        self.pad_multiple = TILE_MULTIPLE
        self.encoder = ResNet(depth, self.in_channels)
        self.encoder.segment_prefix = "encoder."
        deepest = self.encoder.out_channels[-1]
        self.reduce = nn.Sequential(nn.Conv2d(deepest, corr_width, 1, bias=False), nn.BatchNorm2d(corr_width),
                                    nn.ReLU(inplace=True))
        self.correlations = nn.ModuleList([ContextCorrelation(corr_width, key_width) for _ in range(3)])
        self.fusion = AdaptiveFusion(corr_width, 3)
        self.decoder = FPN([*self.encoder.out_channels[:3], corr_width], self.num_classes, fpn_width)

    def tiling(self, size: tuple[int, int]) -> Tiling:
        """The crop grid used for an ``(H, W)`` input."""
        return plan_tiling(size, self.crop_size)

    def sizes(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(input_size, padded_size)`` of ``x (B, C, H, W)``: padded to the crop grid."""
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        return input_size, self.tiling(input_size).padded

    def pretrained_backbones(self) -> dict[str, str]:
        """Submodule path -> torchvision architecture whose ImageNet file fits it."""
        return {"encoder": f"resnet{self.encoder.depth}"}

    def _encode(self, x: Tensor, jobs: list[tuple[int, Window]], size: tuple[int, int]) -> list[Tensor]:
        raw, keep = cut_windows(x, jobs)
        return self.encoder(raw, input_transform=window_transform(self.normalizer, keep, size))

    def _head(self, c2: Tensor, c3: Tensor, c4: Tensor, c5: Tensor, medium: Tensor, large: Tensor) -> Tensor:
        local = self.reduce(c5)
        views = [local, self.reduce(medium), self.reduce(large)]
        correlated = [block(local, view) for block, view in zip(self.correlations, views)]
        fused = local + self.fusion(correlated)
        logits, _, _ = self.decoder([c2, c3, c4, fused])
        return logits

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment whole images crop by crop, each crop with its two contexts.

        Args:
            x: ``(B, C, H, W)`` raw bands, any dtype and size.

        Returns:
            eval: logits ``(B, K, H, W)``. train: ``dict(logits=(B, K, Hp/4, Wp/4), aux=[],
            input_size, padded_size)``.
        """
        input_size, padded = self.sizes(x)
        tiling = self.tiling(input_size)
        jobs = [(b, window) for b in range(x.shape[0]) for window in tiling.windows()]
        crops: list[Tensor] = []
        for start in range(0, len(jobs), self.crop_batch):
            chunk = jobs[start : start + self.crop_batch]
            c2, c3, c4, c5 = self._encode(x, chunk, tiling.crop)
            medium, large = (self._encode(x, [(b, context_window(w, f)) for b, w in chunk], tiling.crop)[-1]
                             for f in self.contexts)
            crops.append(self.segment("head", self._head, c2, c3, c4, c5, medium, large))
        logits = stitch(torch.cat(crops), tiling, x.shape[0])
        return self.outputs(logits, [], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """Segments to checkpoint: the encoder's (run three times per chunk) and ``head``."""
        return [*self.encoder.segment_plan(granularity), "head"]


def build_fctl(
    num_classes: int,
    in_channels: int,
    band_mean: Sequence[float] | None = None,
    band_std: Sequence[float] | None = None,
    **options: Any,
) -> FCtL:
    """Build FCtL (the ``"fctl"`` entry of ``MODEL_BUILDERS``).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean (raw units) or ``None``.
        band_std: per-band std or ``None``.
        **options: :class:`FCtL` options (``crop_size``, ``medium_context``, ``large_context``,
            ``depth``, ``fpn_width``, ``corr_width``, ``key_width``, ``crop_batch``).

    Returns:
        the model.

    Raises:
        ConfigError: for an unknown option or a value out of range.
    """
    refuse_unknown_options(FCtL, options)
    return FCtL(num_classes, in_channels, band_mean, band_std, **options)
