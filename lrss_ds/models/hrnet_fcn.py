"""HRNet-FCN baseline: HRNetV2 with its plain segmentation head, whole-image, patch or downsampled."""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import Resize, SegHead, SegmentationModel
from lrss_ds.models.hrnet import HRNet, concat_branches, hrnet_width

MODES: tuple[str, ...] = ("holistic", "patch", "downsampled")


class HRNetFCN(SegmentationModel):
    """HRNet-FCN (HRNetV2 backbone + HRNetV2 head), the papers' generic-SS baseline.

    Three modes share one network and differ in what it sees:

    * ``holistic``: the whole scene in one forward.
    * ``patch``: trained on patches and run on patches whose logits the prediction code
      stitches (``patch_size``/``overlap`` are recorded in :meth:`config` for it; the
      forward itself is the holistic one applied to whatever it gets).
    * ``downsampled``: the input is average-pooled by the integer ``downsample`` inside the
      first segment, and the logits (at ``output_stride * downsample`` of the input) are
      upsampled back by the loss / eval path, so the output has the input's size.

    Segments: the backbone's (see :class:`HRNet`) and ``head`` (concatenation + head).

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        backbone: ``hrnet_w18``, ``hrnet_w32`` or ``hrnet_w48``.
        output_stride: 4 (HRNetV2) or 8 (see :class:`HRNet`).
        mode: ``holistic``, ``patch`` or ``downsampled``.
        downsample: integer input reduction of the ``downsampled`` mode.
        patch_size: ``(height, width)`` of the ``patch`` mode's patches (an int = square).
        overlap: pixels by which neighbouring patches overlap when stitched.

    Raises:
        ConfigError: for an unknown mode or backbone, or a bad downsample/patch option.
    """

    name = "hrnet_fcn"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        backbone: str = "hrnet_w18",
        output_stride: int = 4,
        mode: str = "holistic",
        downsample: int = 4,
        patch_size: int | Sequence[int] = 512,
        overlap: int = 64,
    ) -> None:
        if mode not in MODES:
            raise ConfigError("mode", f"unknown mode {mode!r}; choose from {list(MODES)}")
        if int(downsample) != downsample or downsample < 1:
            raise ConfigError("downsample", f"must be an integer >= 1, got {downsample}")
        patch = (int(patch_size), int(patch_size)) if isinstance(patch_size, int) else tuple(int(p) for p in patch_size)
        if len(patch) != 2 or min(patch) < 1 or not 0 <= overlap < min(patch):
            raise ConfigError("patch_size", f"needs (height, width) >= 1 and 0 <= overlap < size, got {patch_size}/{overlap}")
        super().__init__(
            num_classes,
            in_channels,
            band_mean,
            band_std,
            backbone=backbone,
            output_stride=output_stride,
            mode=mode,
            downsample=int(downsample),
            patch_size=patch,
            overlap=int(overlap),
        )
        self.mode = mode
        self.patch_size: tuple[int, int] = patch  # read by the prediction code's stitching
        self.overlap = int(overlap)
        self.downsample = int(downsample) if mode == "downsampled" else 1
        self.backbone = HRNet(hrnet_width(backbone), in_channels, output_stride)
        # HRNetV2's head: 1x1 conv-BN-ReLU keeping the concatenated width, then 1x1 to classes
        self.head = SegHead(sum(self.backbone.out_channels), num_classes, sum(self.backbone.out_channels))
        self.resize = Resize()
        self.output_stride = output_stride * self.downsample
        self.pad_multiple = self.backbone.total_stride * self.downsample

    def _input(self, x: Tensor) -> Tensor:
        """Normalise, pad and (downsampled mode) pool: ``(B, C, H, W) -> (B, C, Hp/ds, Wp/ds)``."""
        x = self.prepare_input(x)
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return x

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp/os, Wp/os),
            aux=[], input_size, padded_size)`` with ``os = output_stride * downsample``.
        """
        input_size, padded = self.sizes(x)
        features = self.backbone(x, input_transform=self._input)
        logits = self.segment("head", lambda *fs: self.head(concat_branches(list(fs), getattr(self, "resize", None))), *features)
        return self.outputs(logits, [], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """The backbone's plan for ``granularity`` followed by ``head``."""
        return [*self.backbone.segment_plan(granularity), "head"]
