"""FCN-8s (Long, Shelhamer and Darrell, CVPR 2015): VGG-16 scores at strides 32, 16 and 8 fused by learned upsampling."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, require_counts, require_dropout
from lrss_ds.models.segnet import VGG16_BLOCKS, vgg16_encoder

FINAL_UPSAMPLING: tuple[str, ...] = ("bilinear", "learned")


def bilinear_kernel(channels: int, factor: int) -> Tensor:
    """The ``(channels, channels, 2f, 2f)`` transposed-convolution weight of bilinear ``factor``x upsampling.

    Each channel is upsampled on its own (zero between channels). With stride ``f`` and padding
    ``f / 2`` a transposed convolution of this kernel equals bilinear interpolation
    (``align_corners=False``) away from the border, which is how FCN initialises its upsampling.
    """
    size = 2 * factor
    center = factor - 0.5
    taps = 1.0 - (torch.arange(size, dtype=torch.float64) - center).abs() / factor
    kernel = (taps[:, None] * taps[None, :]).to(torch.float32)
    weight = torch.zeros(channels, channels, size, size)
    for c in range(channels):
        weight[c, c] = kernel
    return weight


def upsampler(channels: int, factor: int) -> nn.ConvTranspose2d:
    """A learned ``factor``x upsampling of class scores, initialised to bilinear (no bias, as in FCN)."""
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, factor))
    return layer


class FCN8s(SegmentationModel):
    """FCN-8s: VGG-16 made fully convolutional, with class scores from pool5, pool4 and pool3 fused.

    * Encoder: VGG-16's 13 convolutions in five blocks, each ended by a 2x2 max-pool; N bands
      enter the first convolution. ``pool3``, ``pool4`` and ``pool5`` are at strides 8, 16, 32.
    * ``fc6`` (7x7, ``fc_channels``) and ``fc7`` (1x1), each with ReLU and dropout, are VGG's
      fully connected layers as convolutions; ``score_fr`` (1x1) gives K class scores at 1/32.
    * Skip fusion: the 1/32 scores upsampled 2x (``upscore2``) plus ``score_pool4`` (1x1 on
      pool4); that sum upsampled 2x (``upscore_pool4``) plus ``score_pool3`` (1x1 on pool3):
      the 1/8 scores. Both 2x upsamplings are transposed convolutions (4x4, stride 2) initialised
      to bilinear interpolation and learned, as in the paper.
    * The final 8x upsampling: the paper fixes it to bilinear interpolation, so by default the
      logits leave the network at 1/8 (``output_stride = 8``) and the shared bilinear upsampling
      of ``SegmentationModel.outputs`` takes them to pixels (which also lets whole-scene prediction
      upsample them in row bands). ``final_upsampling="learned"`` makes it a 16x16 stride-8
      transposed convolution initialised to bilinear and trained (``output_stride = 1``).

    Choices where the paper leaves room or does not fit this package:

    * Input size: the Caffe net pads its first convolution by 100 px so any input reaches
      fc6's valid 7x7, and crops the upsampled scores back with fixed offsets. Here the
      normalised input is padded at the bottom/right to a multiple of 32 (five poolings), fc6
      is padded by 3, every skip map then has exactly twice the size of the coarser one (no
      offsets), and the logits are cropped to the input. This saves the margin's work (a 512 px
      patch becomes 712 px with it: 93% more pixels) and keeps the network's receptive field.
    * BatchNorm after every encoder convolution (VGG-16-BN): the paper fine-tunes ImageNet
      VGG-16 without BN; trained from scratch at small batches, as here (nothing is
      downloaded), plain VGG-16 does not train reliably. fc6/fc7 keep the paper's bias, ReLU
      and dropout (``dropout``, 0.5) without BN.
    * One-stage training: the paper trains FCN-32s, then 16s, then 8s, zero-initialising each
      new score layer so that a stage starts from the previous one's predictions. Trained at
      once from scratch, every score layer gets PyTorch's default initialisation instead
      (zero-initialised score layers would pass no gradient to the encoder on the first step).

    Segments: ``enc1``..``enc5`` (``enc1`` holds the normaliser and padding), ``fc`` (fc6, fc7,
    score_fr) and ``fuse`` (the skip scores and the upsamplings), at every granularity.

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        width: channels of the first VGG block (the others are 2x, 4x, 8x, 8x it; 64 = VGG-16).
        fc_channels: channels of fc6 and fc7 (4096 = VGG-16, 134 M parameters at 3 bands and 21
            classes, as the paper's net).
        dropout: dropout probability after fc6 and fc7.
        final_upsampling: ``"bilinear"`` (the paper's fixed 8x) or ``"learned"``.

    Raises:
        ConfigError: for a width or fc_channels < 1, a dropout outside [0, 1) or an unknown
            final_upsampling.
    """

    name = "fcn8s"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        width: int = 64,
        fc_channels: int = 4096,
        dropout: float = 0.5,
        final_upsampling: str = "bilinear",
    ) -> None:
        require_counts(width=width, fc_channels=fc_channels)
        require_dropout(dropout)
        if final_upsampling not in FINAL_UPSAMPLING:
            raise ConfigError("model.final_upsampling",
                              f"unknown value {final_upsampling!r}; choose from {list(FINAL_UPSAMPLING)}")
        super().__init__(num_classes, in_channels, band_mean, band_std, width=int(width),
                         fc_channels=int(fc_channels), dropout=float(dropout), final_upsampling=final_upsampling)
        self.pad_multiple = 2 ** len(VGG16_BLOCKS)
        self.output_stride = 8 if final_upsampling == "bilinear" else 1
        k = self.num_classes
        self.encoder, channels = vgg16_encoder(self.in_channels, int(width))
        self.fc = nn.Sequential(
            nn.Conv2d(channels[4], int(fc_channels), 7, padding=3), nn.ReLU(inplace=True), nn.Dropout(float(dropout)),
            nn.Conv2d(int(fc_channels), int(fc_channels), 1), nn.ReLU(inplace=True), nn.Dropout(float(dropout)),
        )
        self.score_fr = nn.Conv2d(int(fc_channels), k, 1)
        self.score_pool4 = nn.Conv2d(channels[3], k, 1)
        self.score_pool3 = nn.Conv2d(channels[2], k, 1)
        self.upscore2 = upsampler(k, 2)
        self.upscore_pool4 = upsampler(k, 2)
        self.upscore8 = upsampler(k, 8) if final_upsampling == "learned" else None

    def _encode(self, index: int, x: Tensor) -> Tensor:
        """Encoder block ``index`` then its 2x2 max-pool (block 0 normalises and pads first)."""
        if index == 0:
            x = self.prepare_input(x)
        return F.max_pool2d(self.encoder[index](x), 2, 2)

    def _fuse(self, scores32: Tensor, pool4: Tensor, pool3: Tensor) -> Tensor:
        """``(B, K, h/32, w/32)``, pool4 ``(B, C4, h/16, w/16)``, pool3 ``(B, C3, h/8, w/8)`` ->
        ``(B, K, h/8, w/8)`` (``(B, K, h, w)`` with the learned final upsampling)."""
        fused16 = self.upscore2(scores32) + self.score_pool4(pool4)
        fused8 = self.upscore_pool4(fused16) + self.score_pool3(pool3)
        return fused8 if self.upscore8 is None else self.upscore8(fused8)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp/8, Wp/8), aux=[],
            input_size, padded_size)`` (``Hp x Wp`` logits with the learned final upsampling).
        """
        input_size, padded = self.sizes(x)
        pools: list[Tensor] = []
        for i in range(len(self.encoder)):
            x = self.segment(f"enc{i + 1}", lambda t, i=i: self._encode(i, t), x)
            pools.append(x)
        scores32 = self.segment("fc", lambda t: self.score_fr(self.fc(t)), pools[4])
        logits = self.segment("fuse", self._fuse, scores32, pools[3], pools[2])
        return self.outputs(logits, [], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """``enc1``..``enc5``, ``fc``, ``fuse`` at every granularity."""
        return [*(f"enc{i}" for i in range(1, len(VGG16_BLOCKS) + 1)), "fc", "fuse"]
