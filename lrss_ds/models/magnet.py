"""MagNet: one segmentation network at several scales, and a refinement module between scales.

Huynh, Tran, Luu & Hoai, "Progressive Semantic Segmentation", CVPR 2021 (a row of EHSNet's
Tables 1 and 3). Composition::

    segmentation network : ResNet + FPN (GLNet's FPN, :class:`lrss_ds.models.glnet.FPN`),
                           ONE network for every scale (MagNet's DeepGlobe backbone)
    refiner              : RefinementModule(coarse probabilities, scale probabilities)
    merge                : replace_uncertain (the most uncertain points of the coarse map
                           take the refined values)

Scales. Scale 0 is the whole (padded) image downsampled so that its longer side is
``crop_size`` (not enlarged): "the whole image downsampled to the patch size". Scale
``s = 1 .. num_scales - 1`` cuts the image into square-ish windows of ``2^k`` crops
(``k = num_scales - 1 - s``), each resampled to one crop; the last scale is the full
resolution on the crop grid of :func:`lrss_ds.models.glsnet.plan_tiling`. With the defaults
(``num_scales=2``) this is the single-stage refinement the EHSNet authors ran (§4.4: "we can only
re-implement one-stage refinement"); ``num_scales=3`` on a 2448 px DeepGlobe image with 612 px
crops gives MagNet's 612 -> 1224 -> 2448 schedule.

Each refinement stage, per window of the new scale::

    prior    = cumulative map of the previous scale, resampled to the window (probabilities)
    seg      = softmax(segmentation network(window))
    refined  = softmax(refiner(prior, seg))
    score    = median_blur(u(prior) * (1 - u(refined)))      u(p) = 1 - (p_top1 - p_top2)
    merged   = refined at the round(refine_fraction * h * w) points of highest score, prior elsewhere

and the merged windows, stitched, are the next scale's cumulative map. The eval output is the
last cumulative map.

Where the paper is vague, this is what we do and why:

* **Uncertainty.** The paper takes a pixel's uncertainty from the gap between its two highest
  scores; we use ``u = 1 - (top1 - top2)`` on probabilities (in [0, 1]) and score a point by
  "uncertain before, certain after": ``u(prior) * (1 - u(refined))``, median-filtered with an
  odd ``smooth_kernel`` (0 or 1: off). The released DeepGlobe setting filters with 17 px at
  the 508 px input; our maps are at stride 4 of the crop, so the default is 5.
* **How many points.** ``refine_fraction`` of each window's map points (default 0.5, the
  fraction the released training code merges; its DeepGlobe test replaces all points, 1.0).
  Points are chosen per window, not over the whole scale map at once, so that no map larger
  than the cumulative one is ever built; MagNet-Fast's choice of only the most uncertain
  windows is not built (every window is refined).
* **Refinement module** (the released architecture): BatchNorm on the concatenated 2K
  probability channels, two 3x3 conv-BN-ReLU to 64 channels, two ResNet bottlenecks (64 -> 128),
  a 1x1 convolution to K.
* **Training in one stage.** MagNet trains the segmentation network first (patches of every
  scale) and then the refiner with the network frozen. Here both train together from one
  loss: the segmentation network's logits at every scale are auxiliary outputs (so it learns
  every scale, as in its own stage), the refiner's inputs are detached (so its loss does not
  reach the network, as with a frozen one) and its logits are an auxiliary output (its own
  stage's loss), and the main output is ``log`` of the merged cumulative map (its gradient
  reaches the refined values at the replaced points and the coarse ones elsewhere).
* **Resolution.** Maps are at stride 4 of each scale's input (the FPN's output), not
  upsampled to the crop as in the released code; windows are non-overlapping.

Outputs: main logits ``log(cumulative)`` at stride 4 of the padded image; aux = [coarse logits
(stride 4 of the downsampled image), the network's logits at scales 1.., the refiner's logits
at scales 1..], every map covering the padded image.

BatchNorm in train mode normalises each chunk of ``crop_batch`` windows with that chunk's
statistics, so train-mode outputs depend on ``crop_batch``; eval-mode outputs do not.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, refuse_unknown_options
from lrss_ds.models.glnet import FPN, window_grid
from lrss_ds.models.tiling import TILE_MULTIPLE, Tiling, plan_tiling, stitch
from lrss_ds.models.multiscale import cut_windows, fit_longer_side, window_transform
from lrss_ds.models.resnet import LAYOUTS, Bottleneck, ResNet

MAX_SCALES = 5
"""Windows of up to 8 crops: their stride-4 maps then tile the padded image exactly (crops are multiples of 32)."""


def uncertainty(probs: Tensor) -> Tensor:
    """``1 - (p_top1 - p_top2)`` per point: 0 when one class has all the mass, 1 at a tie.

    Args:
        probs: ``(N, K, h, w)`` class probabilities, ``K >= 2``.

    Returns:
        ``(N, 1, h, w)``.
    """
    top2 = probs.topk(2, dim=1).values
    return 1.0 - (top2[:, :1] - top2[:, 1:2])


def median_blur(score: Tensor, kernel: int) -> Tensor:
    """Median filter of a one-channel map (edges replicated).

    Args:
        score: ``(N, 1, h, w)``.
        kernel: odd window side; ``<= 1`` returns ``score`` unchanged.

    Returns:
        ``(N, 1, h, w)``.
    """
    if kernel <= 1:
        return score
    n, _, h, w = score.shape
    padded = F.pad(score, (kernel // 2,) * 4, mode="replicate")
    return F.unfold(padded, kernel).median(dim=1).values.view(n, 1, h, w)


def replace_uncertain(prior: Tensor, refined: Tensor, fraction: float, kernel: int) -> tuple[Tensor, Tensor]:
    """Replace the points of ``prior`` that the refinement is surest to improve by ``refined``.

    The score of a point is ``u(prior) * (1 - u(refined))`` (uncertain before, certain after,
    :func:`uncertainty`), median-filtered (:func:`median_blur`); the ``round(fraction * h * w)``
    points of highest score per map take ``refined``'s values, the rest keep ``prior``'s.

    Args:
        prior: ``(N, K, h, w)`` probabilities of the coarser scale on this window.
        refined: ``(N, K, h, w)`` refined probabilities.
        fraction: share of points replaced, in (0, 1].
        kernel: median filter side (odd; ``<= 1`` = none).

    Returns:
        ``(merged (N, K, h, w), chosen (N, 1, h, w) bool)``; ``merged`` is differentiable in
        both inputs (the choice itself is not).
    """
    n, _, h, w = prior.shape
    with torch.no_grad():
        score = median_blur(uncertainty(prior.float()) * (1.0 - uncertainty(refined.float())), kernel)
        count = min(h * w, max(1, round(fraction * h * w)))
        index = score.flatten(1).topk(count, dim=1).indices
        chosen = torch.zeros(n, h * w, dtype=torch.bool, device=prior.device).scatter_(1, index, True)
        chosen = chosen.view(n, 1, h, w)
    return torch.where(chosen, refined, prior), chosen


class RefinementModule(nn.Module):
    """MagNet's refiner: (coarse, scale) probabilities -> refined logits, same size.

    Args:
        num_classes: K.
        width: channels of the two 3x3 convolutions (64); the bottlenecks output ``2 * width``.
    """

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        half = width // 2
        self.input_bn = nn.BatchNorm2d(2 * num_classes)
        self.conv = nn.Sequential(
            nn.Conv2d(2 * num_classes, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        project = nn.Sequential(nn.Conv2d(width, half * 4, 1, bias=False), nn.BatchNorm2d(half * 4))
        self.residual = nn.Sequential(Bottleneck(width, half, downsample=project), Bottleneck(half * 4, half))
        self.classifier = nn.Conv2d(half * 4, num_classes, 1, bias=False)

    def forward(self, coarse: Tensor, fine: Tensor) -> Tensor:
        """``(N, K, h, w)`` x 2 -> ``(N, K, h, w)`` refined logits."""
        return self.classifier(self.residual(self.conv(self.input_bn(torch.cat([coarse, fine], dim=1)))))


class MagNet(SegmentationModel):
    """MagNet with ``num_scales - 1`` refinement stages (see the module docstring).

    Args:
        num_classes: K (at least 2: the uncertainty compares the two best classes).
        in_channels: input bands C.
        band_mean: per-band mean for the normaliser (raw units), ``None`` = 0.
        band_std: per-band std, ``None`` = 1.
        crop_size: largest crop side in pixels, a multiple of 32 (default 512); also the
            longer side of the coarsest scale.
        num_scales: scales including the coarsest (2..5; default 2 = one refinement stage).
        depth: ResNet depth of the segmentation network (50, MagNet's DeepGlobe backbone).
        fpn_width: FPN width (256).
        refine_fraction: share of each window's points the refiner may replace, in (0, 1].
        smooth_kernel: median filter side on the point scores (odd, or 0/1 = none).
        crop_batch: windows run through the network together (default 4).

    Raises:
        ConfigError: for an option out of range.
    """

    name = "magnet"
    output_stride = 4

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        crop_size: int = 512,
        num_scales: int = 2,
        depth: int = 50,
        fpn_width: int = 256,
        refine_fraction: float = 0.5,
        smooth_kernel: int = 5,
        crop_batch: int = 4,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            band_mean,
            band_std,
            crop_size=crop_size,
            num_scales=num_scales,
            depth=depth,
            fpn_width=fpn_width,
            refine_fraction=refine_fraction,
            smooth_kernel=smooth_kernel,
            crop_batch=crop_batch,
        )
        if self.num_classes < 2:
            raise ConfigError("num_classes", f"MagNet needs at least 2 classes, got {num_classes}")
        if crop_size < TILE_MULTIPLE or crop_size % TILE_MULTIPLE:
            raise ConfigError("crop_size", f"must be a positive multiple of {TILE_MULTIPLE}, got {crop_size}")
        if not 2 <= num_scales <= MAX_SCALES:
            raise ConfigError("num_scales", f"must be in 2..{MAX_SCALES}, got {num_scales}")
        if depth not in LAYOUTS:
            raise ConfigError("depth", f"must be one of {sorted(LAYOUTS)}, got {depth}")
        if fpn_width < 2 or fpn_width % 2:
            raise ConfigError("fpn_width", f"must be an even number >= 2, got {fpn_width}")
        if not 0.0 < refine_fraction <= 1.0:
            raise ConfigError("refine_fraction", f"must be in (0, 1], got {refine_fraction}")
        if smooth_kernel < 0 or (smooth_kernel > 1 and smooth_kernel % 2 == 0):
            raise ConfigError("smooth_kernel", f"must be 0, 1 or an odd number, got {smooth_kernel}")
        if crop_batch < 1:
            raise ConfigError("crop_batch", f"must be >= 1, got {crop_batch}")
        self.crop_size = crop_size
        self.num_scales = num_scales
        self.refine_fraction = float(refine_fraction)
        self.smooth_kernel = smooth_kernel
        self.crop_batch = crop_batch
        self.pad_multiple = TILE_MULTIPLE
        self.backbone = ResNet(depth, self.in_channels)
        self.backbone.segment_prefix = "backbone."
        self.fpn = FPN(self.backbone.out_channels, self.num_classes, fpn_width)
        self.refiner = RefinementModule(self.num_classes)

    def tiling(self, size: tuple[int, int]) -> Tiling:
        """The full-resolution crop grid used for an ``(H, W)`` input."""
        return plan_tiling(size, self.crop_size)

    def sizes(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(input_size, padded_size)`` of ``x (B, C, H, W)``: padded to the crop grid."""
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        return input_size, self.tiling(input_size).padded

    def coarse_size(self, padded: tuple[int, int]) -> tuple[int, int]:
        """Input size of scale 0: the padded image with its longer side at ``crop_size``."""
        return fit_longer_side(padded, self.crop_size, TILE_MULTIPLE)

    def scale_grids(self, tiling: Tiling) -> list[Tiling]:
        """The window grids of scales 1..num_scales-1 (full-resolution pixels), coarse to fine.

        Scale ``s`` has windows of ``2^k`` crops (``k = num_scales - 1 - s``) from the origin;
        the last row/column may reach beyond the padded image.
        """
        grids = []
        for k in range(self.num_scales - 2, -1, -1):
            side = (tiling.crop[0] << k, tiling.crop[1] << k)
            rows, cols = math.ceil(tiling.rows / (1 << k)), math.ceil(tiling.cols / (1 << k))
            grids.append(Tiling(rows, cols, side, (rows * side[0], cols * side[1])))
        return grids

    def pretrained_backbones(self) -> dict[str, str]:
        """Submodule path -> torchvision architecture whose ImageNet file fits it."""
        return {"backbone": f"resnet{self.backbone.depth}"}

    def _segment(self, raw: Tensor, keep: Tensor | None, size: tuple[int, int]) -> Tensor:
        """The segmentation network on raw windows resampled to ``size``: ``(N, K, h/4, w/4)`` logits."""
        feats = self.backbone(raw, input_transform=window_transform(self.normalizer, keep, size))
        return self.segment("fpn", lambda *c: self.fpn(list(c))[0], *feats)

    def _refine(self, prior: Tensor, seg_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Refiner and merge on one chunk: ``(merged probabilities, refiner logits)``."""

        def run(prior_: Tensor, seg_: Tensor) -> tuple[Tensor, Tensor]:
            # Detached inputs: the refiner's loss trains the refiner only (MagNet's frozen network).
            logits = self.refiner(prior_.detach(), seg_.detach().softmax(dim=1))
            merged, _ = replace_uncertain(prior_, logits.softmax(dim=1), self.refine_fraction, self.smooth_kernel)
            return merged, logits

        return self.segment("refine", run, prior, seg_logits)

    def _stage(self, x: Tensor, cumulative: Tensor, grid: Tiling, crop: tuple[int, int],
               padded: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """One refinement stage over ``grid``: ``(merged, network logits, refiner logits)`` stitched."""
        batch = x.shape[0]
        jobs = [(b, window) for b in range(batch) for window in grid.windows()]
        map_size = (crop[0] // 4, crop[1] // 4)
        merged, seg, refined = [], [], []
        for start in range(0, len(jobs), self.crop_batch):
            chunk = jobs[start : start + self.crop_batch]
            raw, keep = cut_windows(x, chunk)
            seg_logits = self._segment(raw, keep, crop)
            index = torch.tensor([b for b, _ in chunk], device=x.device)
            grids = window_grid([w for _, w in chunk], padded, map_size, x.device)
            prior = F.grid_sample(cumulative.index_select(0, index), grids.to(cumulative.dtype), mode="bilinear",
                                  padding_mode="border", align_corners=False)
            chunk_merged, chunk_refined = self._refine(prior, seg_logits)
            merged.append(chunk_merged)
            seg.append(seg_logits)
            refined.append(chunk_refined)
        # The grid reaches beyond the padded image by less than one window: keep the maps' share
        # of the padded image (a whole number of points: crops are multiples of 32, windows of
        # at most 8 crops).
        scale = grid.crop[0] // map_size[0]
        rows, cols = padded[0] // scale, padded[1] // scale

        def whole(parts: list[Tensor]) -> Tensor:
            return stitch(torch.cat(parts), grid, batch)[..., :rows, :cols]

        return whole(merged), whole(seg), whole(refined)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment whole images coarse to fine.

        Args:
            x: ``(B, C, H, W)`` raw bands, any dtype and size.

        Returns:
            eval: logits ``(B, K, H, W)`` (``log`` of the final cumulative probabilities).
            train: ``dict(logits=(B, K, Hp/4, Wp/4), aux=[coarse, network at scales 1..,
            refiner at scales 1..], input_size, padded_size)``.
        """
        input_size, padded = self.sizes(x)
        tiling = self.tiling(input_size)
        whole = [(b, (0, 0, padded[0], padded[1])) for b in range(x.shape[0])]
        raw, keep = cut_windows(x, whole)
        coarse_logits = self._segment(raw, keep, self.coarse_size(padded))
        cumulative = coarse_logits.float().softmax(dim=1)
        seg_maps, refined_maps = [], []
        for grid in self.scale_grids(tiling):
            cumulative, seg_logits, refined_logits = self._stage(x, cumulative, grid, tiling.crop, padded)
            seg_maps.append(seg_logits)
            refined_maps.append(refined_logits)
        logits = cumulative.float().clamp_min(1e-6).log()
        return self.outputs(logits, [coarse_logits, *seg_maps, *refined_maps], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """Segments to checkpoint: the backbone's, ``fpn`` and ``refine`` (each run once per chunk and scale)."""
        return [*self.backbone.segment_plan(granularity), "fpn", "refine"]


def build_magnet(
    num_classes: int,
    in_channels: int,
    band_mean: Sequence[float] | None = None,
    band_std: Sequence[float] | None = None,
    **options: Any,
) -> MagNet:
    """Build MagNet (the ``"magnet"`` entry of ``MODEL_BUILDERS``).

    Args:
        num_classes: K.
        in_channels: input bands C.
        band_mean: per-band mean (raw units) or ``None``.
        band_std: per-band std or ``None``.
        **options: :class:`MagNet` options (``crop_size``, ``num_scales``, ``depth``,
            ``fpn_width``, ``refine_fraction``, ``smooth_kernel``, ``crop_batch``).

    Returns:
        the model.

    Raises:
        ConfigError: for an unknown option or a value out of range.
    """
    refuse_unknown_options(MagNet, options)
    return MagNet(num_classes, in_channels, band_mean, band_std, **options)
