"""SegNet (Badrinarayanan et al., TPAMI 2017): a VGG-16 encoder and a decoder that unpools with its indices."""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.models.base import SegmentationModel, require_counts

# VGG-16's 13 convolutions in five blocks: (convolutions, channels at width 64).
VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


def conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    """A 3x3 convolution (no bias: BN follows), BatchNorm and ReLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def vgg16_encoder(in_channels: int, width: int) -> tuple[nn.ModuleList, list[int]]:
    """VGG-16's five convolution blocks with BN (pooling is left to the caller).

    Args:
        in_channels: input bands (the first convolution takes them all).
        width: channels of the first block; the others are 2x, 4x, 8x, 8x it (64 = VGG-16).

    Returns:
        ``(blocks, channels)``: five ``nn.Sequential`` of 3x3 conv-BN-ReLU, and each block's
        output channels.
    """
    channels = [c * int(width) // 64 for _, c in VGG16_BLOCKS]
    blocks = nn.ModuleList()
    c_in = in_channels
    for (convs, _), c_out in zip(VGG16_BLOCKS, channels):
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += conv_bn_relu(c_in if i == 0 else c_out, c_out)
        blocks.append(nn.Sequential(*layers))
        c_in = c_out
    return blocks, channels


class SegNet(SegmentationModel):
    """SegNet: encoder = VGG-16's 13 convolutions with BN, each block ending in a 2x2 max-pool
    whose argmax indices are kept; decoder = the mirror image, each block starting with a
    max-unpool at those indices (no learned upsampling, no feature skip), then a 3x3 classifier.

    Choices where the paper leaves room, as its reference (Caffe) model does: every decoder
    convolution is followed by BN and ReLU; the last convolution of each decoder block maps to
    the next block's width, and the final 64-channel map goes through a 3x3 convolution to the
    K classes (the paper's "trainable soft-max classifier"). The encoder takes N bands in its
    first convolution. ``width`` scales every block (64 = VGG-16, 29.4 M parameters); the input
    is padded to a multiple of 32 (five poolings) and the full-resolution logits cropped back.

    Segments: ``enc1``..``enc5`` (``enc1`` holds the normaliser and padding), ``dec5``..``dec1``
    and ``head``, at every granularity (a block is a few convolutions).

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        width: channels of the first block (the others are 2x, 4x, 8x, 8x it).

    Raises:
        ConfigError: for a width < 1.
    """

    name = "segnet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        width: int = 64,
    ) -> None:
        require_counts(width=width)
        super().__init__(num_classes, in_channels, band_mean, band_std, width=int(width))
        self.output_stride = 1
        self.pad_multiple = 2 ** len(VGG16_BLOCKS)
        self.encoder, channels = vgg16_encoder(self.in_channels, int(width))
        # decoder[i] mirrors encoder[i]: its convolutions keep encoder i's width and the last
        # one maps to encoder i-1's (block 1 stays at its own width, for the classifier).
        self.decoder = nn.ModuleList()
        for i, ((convs, _), c_out) in enumerate(zip(VGG16_BLOCKS, channels)):
            target = channels[i - 1] if i > 0 else c_out
            layers: list[nn.Module] = []
            for j in range(convs):
                layers += conv_bn_relu(c_out, target if j == convs - 1 else c_out)
            self.decoder.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(channels[0], self.num_classes, 3, padding=1)

    def _encode(self, index: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder block ``index`` then 2x2 max-pool: ``(pooled, argmax indices)``."""
        if index == 0:
            x = self.prepare_input(x)
        return F.max_pool2d(self.encoder[index](x), 2, 2, return_indices=True)

    def _decode(self, index: int, x: Tensor, indices: Tensor) -> Tensor:
        """Unpool at the encoder's indices to twice the size, then decoder block ``index``."""
        size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.decoder[index](F.max_unpool2d(x, indices, 2, 2, output_size=size))

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp, Wp), aux=[],
            input_size, padded_size)``.
        """
        input_size, padded = self.sizes(x)
        all_indices: list[Tensor] = []
        for i in range(len(self.encoder)):
            x, indices = self.segment(f"enc{i + 1}", lambda t, i=i: self._encode(i, t), x)
            all_indices.append(indices)
        for i in reversed(range(len(self.decoder))):
            x = self.segment(f"dec{i + 1}", lambda t, idx, i=i: self._decode(i, t, idx), x, all_indices[i])
        logits = self.segment("head", self.classifier, x)
        return self.outputs(logits, [], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """``enc1``..``enc5``, ``dec5``..``dec1``, ``head`` at every granularity."""
        n = len(VGG16_BLOCKS)
        return [*(f"enc{i}" for i in range(1, n + 1)), *(f"dec{i}" for i in range(n, 0, -1)), "head"]
