"""ICNet (Zhao et al., ECCV 2018): three input resolutions fused by cascade feature fusion."""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel
from lrss_ds.models.resnet import ResNet

BACKBONES: dict[str, int] = {"resnet50": 50, "resnet18": 18}
PYRAMID_BINS: tuple[int, ...] = (1, 2, 3, 6)
CFF_CHANNELS = 128


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias: BN follows), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def upsample2(x: Tensor) -> Tensor:
    """Bilinear 2x upsampling ``(B, C, h, w) -> (B, C, 2h, 2w)``."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """ICNet's pyramid pooling: average pools at ``PYRAMID_BINS``, upsampled and summed with the
    input (ICNet sums where PSPNet concatenates, to save the width), then a 1x1 conv-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, h, w) -> (B, c_out, h, w)``."""
        total = x
        for bins in PYRAMID_BINS:
            pooled = F.adaptive_avg_pool2d(x, bins)
            total = total + F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.reduce(total)


class CascadeFeatureFusion(nn.Module):
    """CFF unit: the coarser map F1, upsampled 2x, through a 3x3 dilation-2 conv + BN; the finer
    map F2 through a 1x1 conv + BN; their sum through ReLU. Also returns the cascade-label
    classifier's logits on the upsampled F1.

    Args:
        c_low: channels of F1 (coarser).
        c_high: channels of F2 (finer, twice F1's resolution).
        num_classes: K of the auxiliary classifier.
    """

    def __init__(self, c_low: int, c_high: int, num_classes: int) -> None:
        super().__init__()
        self.low = nn.Sequential(nn.Conv2d(c_low, CFF_CHANNELS, 3, padding=2, dilation=2, bias=False),
                                 nn.BatchNorm2d(CFF_CHANNELS))
        self.high = nn.Sequential(nn.Conv2d(c_high, CFF_CHANNELS, 1, bias=False), nn.BatchNorm2d(CFF_CHANNELS))
        self.classifier = nn.Conv2d(c_low, num_classes, 1)

    def forward(self, f1: Tensor, f2: Tensor) -> tuple[Tensor, Tensor]:
        """``f1 (B, c_low, h, w)``, ``f2 (B, c_high, 2h, 2w)`` -> ``(fused (B, 128, 2h, 2w),
        aux logits (B, K, 2h, 2w))``."""
        up = upsample2(f1)
        return F.relu(self.low(up) + self.high(f2)), self.classifier(up)


class ICNet(SegmentationModel):
    """ICNet: a heavy branch at 1/4 resolution, a medium one at 1/2 and a light one at full.

    * ``sub1``: the full-resolution input through three 3x3 stride-2 conv-BN-ReLU (32, 32, 64
      channels) to 1/8.
    * ``sub2``: the input downsampled 2x through the ResNet stem, layer1 and the first
      (striding) block of layer2 — the paper's conv1..conv3_1 — to 1/16.
    * ``sub4``: conv3_1's output downsampled 2x through the rest of the ResNet (layer3 and
      layer4 dilated, so 1/32), pyramid pooling and a 1x1 conv to 256 channels. The paper's
      1/4-resolution branch shares conv1..conv3_1 with ``sub2`` this way.
    * ``cff16`` fuses sub4 and sub2 (1/16), ``cff8`` that and sub1 (1/8); the fused map is
      upsampled 2x to the 1/4-resolution classifier (``output_stride = 4``). The two CFF
      classifiers give the cascade-label-guidance logits at 1/16 and 1/8 (``aux``; the paper
      weights them 0.4 against the main loss's 1, here the loss settings' aux weight does).

    Choices where this package differs from the paper's PSPNet50 backbone: the ResNet is the
    torchvision layout (a 7x7 stem instead of PSPNet's three 3x3 convolutions), so ImageNet
    files load by name (``model.pretrained``) into ``backbone.``; ``resnet18`` is offered as a
    light variant. The paper compresses the network by pruning kernels after training; that
    step is not part of the model. Downsampling is bilinear. N bands enter ``sub1``'s first
    convolution and the ResNet's ``conv1``. The input is padded to a multiple of 32.

    Segments: ``sub1`` and ``sub2`` (each normalises and pads the raw input itself, so no
    full-resolution float copy is kept between them), ``sub4``, ``cff16``, ``cff8``, ``head``.

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        backbone: ``resnet50`` (the paper's depth) or ``resnet18``.

    Raises:
        ConfigError: for an unknown backbone.
    """

    name = "icnet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        backbone: str = "resnet50",
    ) -> None:
        if backbone not in BACKBONES:
            raise ConfigError("model.backbone", f"unknown icnet backbone {backbone!r}; choose from {list(BACKBONES)}")
        super().__init__(num_classes, in_channels, band_mean, band_std, backbone=backbone)
        self.output_stride = 4
        self.pad_multiple = 32
        self.backbone = ResNet(BACKBONES[backbone], self.in_channels, replace_stride_with_dilation=(False, True, True))
        self.sub1 = nn.Sequential(
            conv_bn_relu(self.in_channels, 32, 3, 2), conv_bn_relu(32, 32, 3, 2), conv_bn_relu(32, 64, 3, 2)
        )
        c3, c5 = self.backbone.out_channels[1], self.backbone.out_channels[3]
        self.pyramid = PyramidPooling(c5, 256)
        self.cff16 = CascadeFeatureFusion(256, c3, self.num_classes)
        self.cff8 = CascadeFeatureFusion(CFF_CHANNELS, 64, self.num_classes)
        self.classifier = nn.Conv2d(CFF_CHANNELS, self.num_classes, 1)

    def _sub1(self, raw: Tensor) -> Tensor:
        return self.sub1(self.prepare_input(raw))

    def _sub2(self, raw: Tensor) -> Tensor:
        half = F.interpolate(self.prepare_input(raw), scale_factor=0.5, mode="bilinear", align_corners=False)
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(half))))
        return net.layer2[0](net.layer1(x))

    def _sub4(self, conv3_1: Tensor) -> Tensor:
        net = self.backbone
        x = F.interpolate(conv3_1, scale_factor=0.5, mode="bilinear", align_corners=False)
        x = net.layer4(net.layer3(net.layer2[1:](x)))
        return self.pyramid(x)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp/4, Wp/4),
            aux=[(B, K, Hp/16, Wp/16), (B, K, Hp/8, Wp/8)], input_size, padded_size)``.
        """
        input_size, padded = self.sizes(x)
        f_sub1 = self.segment("sub1", self._sub1, x)
        f_sub2 = self.segment("sub2", self._sub2, x)
        f_sub4 = self.segment("sub4", self._sub4, f_sub2)
        fused16, aux16 = self.segment("cff16", self.cff16, f_sub4, f_sub2)
        fused8, aux8 = self.segment("cff8", self.cff8, fused16, f_sub1)
        logits = self.segment("head", lambda t: self.classifier(upsample2(t)), fused8)
        return self.outputs(logits, [aux16, aux8], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """``sub1``, ``sub2``, ``sub4``, ``cff16``, ``cff8``, ``head`` at every granularity."""
        return ["sub1", "sub2", "sub4", "cff16", "cff8", "head"]
