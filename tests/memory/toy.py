"""A tiny segmented model with every segment shape the memory tests need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.models.base import SegmentationModel, upsample_logits


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class Residual(nn.Module):
    """A basic residual block (in-place add after BN, like HRNet's)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), nn.Conv2d(channels, channels, 3, 1, 1, bias=False))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.body(x)) + x)


class ToySegmented(SegmentationModel):
    """Stem (two convs, normaliser inside the first), layer1 (two blocks), a two-branch stage
    returning a list, a head taking that list (with dropout) and an aux head reusing layer1's
    output after stage2 ran (a tensor consumed twice, as in EHSNet's aux path).

    Segments: ``stem`` > ``stem.conv1``, ``stem.conv2``; ``layer1`` > ``layer1.0``,
    ``layer1.1``; ``stage2``; ``head``.
    """

    name = "toy"
    output_stride = 4
    pad_multiple = 8

    def __init__(self, num_classes: int = 3, in_channels: int = 4) -> None:
        super().__init__(num_classes, in_channels, band_mean=[100.0] * in_channels, band_std=[50.0] * in_channels)
        self.conv1 = conv_bn(in_channels, 8, 2)
        self.conv2 = conv_bn(8, 8, 2)
        self.block1 = Residual(8)
        self.block2 = Residual(8)
        self.branch0 = conv_bn(8, 8)
        self.branch1 = conv_bn(8, 16, 2)
        self.drop = nn.Dropout2d(0.3)
        self.head = nn.Conv2d(24, num_classes, 1)
        self.aux = nn.Conv2d(8, num_classes, 1)

    def _stem(self, x: Tensor) -> Tensor:
        x = self.segment("stem.conv1", lambda raw: self.conv1(self.prepare_input(raw)), x)
        return self.segment("stem.conv2", self.conv2, x)

    def _layer1(self, x: Tensor) -> Tensor:
        x = self.segment("layer1.0", self.block1, x)
        return self.segment("layer1.1", self.block2, x)

    def _head(self, feats: list[Tensor]) -> Tensor:
        low = F.interpolate(feats[1], size=feats[0].shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.drop(torch.cat([feats[0], low], 1)))

    def forward(self, x: Tensor):  # noqa: D102 - the SegmentationModel contract
        input_size, padded = self.sizes(x)
        f = self.segment("stem", self._stem, x)
        f = self.segment("layer1", self._layer1, f)
        feats = self.segment("stage2", lambda t: [self.branch0(t), self.branch1(t)], f)
        logits = self.segment("head", self._head, feats)
        return self.outputs(logits, [self.aux(f)], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        return {
            "stage": ["stem", "layer1", "stage2", "head"],
            "block": ["stem", "layer1.0", "layer1.1", "stage2", "head"],
            "fine": ["stem.conv1", "stem.conv2", "layer1.0", "layer1.1", "stage2", "head"],
        }[granularity]


def toy_loss(outputs: dict, target: Tensor) -> Tensor:
    """Cross-entropy of the upsampled main logits + 0.4 x that of the aux logits."""
    target = target.long()
    total = outputs["logits"].new_zeros(())
    for weight, logits in [(1.0, outputs["logits"])] + [(0.4, a) for a in outputs["aux"]]:
        full = upsample_logits(logits, outputs["padded_size"], outputs["input_size"])
        total = total + weight * F.cross_entropy(full.float(), target)
    return total
