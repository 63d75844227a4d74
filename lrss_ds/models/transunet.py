"""TransUNet (Chen et al., 2021): a ResNet stem, a ViT over its 1/16 feature grid, and a cascaded upsampler with skips."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, require_counts, require_dropout
from lrss_ds.models.resnet import ResNet

# The cascaded upsampler (CUP): the width after the token grid, then one block per 2x.
CUP_IN_CHANNELS = 512
DECODER_CHANNELS: tuple[int, ...] = (256, 128, 64, 16)
RESNET_DEPTHS: tuple[int, ...] = (50, 18)


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution (no bias: BN follows), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ViTBlock(nn.Module):
    """A pre-norm transformer layer: x + MHSA(LN(x)), then x + MLP(LN(x)) with GELU (ViT-B's layer).

    Args:
        hidden: token width D.
        heads: attention heads (D must divide by it).
        mlp: the MLP's hidden width.
        dropout: dropout after the attention projection and in the MLP.
    """

    def __init__(self, hidden: int, heads: int, mlp: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, hidden),
                                 nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``; attention through ``scaled_dot_product_attention``, which on
        CPU and GPU does not keep the N x N weights (the token count grows with the scene)."""
        b, n, d = tokens.shape
        q, k, v = self.qkv(self.norm1(tokens)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        tokens = tokens + self.drop(self.proj(attended))
        return tokens + self.mlp(self.norm2(tokens))


class DecoderBlock(nn.Module):
    """One CUP step: 2x bilinear upsampling, concatenation with the skip (if any), two 3x3 conv-BN-ReLU."""

    def __init__(self, c_in: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(c_in + c_skip, c_out), conv_bn_relu(c_out, c_out))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        """``(B, c_in, h, w)`` and skip ``(B, c_skip, 2h, 2w)`` -> ``(B, c_out, 2h, 2w)``."""
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class TransUNet(SegmentationModel):
    """TransUNet's R50-ViT hybrid: CNN features to 1/16, a ViT over that grid, a cascaded upsampler.

    * Encoder CNN: a ResNet's stem (7x7 stride-2 conv, BN, ReLU: the 1/2 skip), max-pool and its
      first three layers (1/4 and 1/8 skips, 1/16 output); N bands enter ``conv1``.
    * ViT: each 1/16 position is one token (the hybrid's 1x1 "patch" embedding to width
      ``hidden``), plus a learned position embedding; ``layers`` pre-norm transformer layers
      and a final LayerNorm (ViT-B/16: 12 layers, width 768, 12 heads, MLP 3072, dropout 0.1).
    * Cascaded upsampler: the tokens back on their grid, a 3x3 conv to 512, then four blocks of
      2x upsampling + skip concatenation + two 3x3 conv-BN-ReLU (256, 128, 64, 16 channels; skips
      at 1/8, 1/4, 1/2, the paper's three) and a 3x3 classifier at full resolution
      (``output_stride = 1``).

    Choices where the paper leaves room or does not fit this package:

    * Any input size: the paper trains and tests at 224 px, where the token grid is 14 x 14 and
      the position embedding has one vector per token. Here the embedding is learned on a
      ``pos_grid`` x ``pos_grid`` grid and resized bilinearly to each input's token grid (as
      ViT does when fine-tuned at another size), so a patch and a whole scene both run; the
      input is padded to a multiple of 16.
    * The CNN is this package's torchvision-layout ResNet (BatchNorm; ResNet-50 has 6 blocks in
      its third layer) so torchvision ImageNet files load by name into ``backbone.``; the paper's
      R50 is BiT's ResNetV2 (GroupNorm, weight-standardised convolutions, 9 blocks in stage 3).
      ResNet-50's fourth layer is not used and not built. ``resnet_depth: 18`` is a light variant.
    * Upsampling is bilinear with ``align_corners=False``, as everywhere in this package.
    * Attention has no dropout (ViT-B's attention dropout is 0).

    Segments: ``stem`` (normaliser, padding), ``layer1`` (max-pool and layer1), ``layer2``,
    ``layer3``, ``embed``; the transformer as ``vit`` at stage granularity or ``vit.0``.. per
    layer at block and fine; ``cup``, ``dec0``..``dec3``, ``head``.

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        resnet_depth: 50 (the paper's hybrid) or 18.
        hidden: token width D.
        layers: transformer layers.
        heads: attention heads.
        mlp: MLP width.
        dropout: dropout of the embedding, attention output and MLP.
        pos_grid: side of the learned position-embedding grid (14 = 224 px / 16, the paper's).

    Raises:
        ConfigError: for an unknown resnet_depth, a non-positive size, ``hidden`` not divisible
            by ``heads``, or a dropout outside [0, 1).
    """

    name = "transunet"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        resnet_depth: int = 50,
        hidden: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp: int = 3072,
        dropout: float = 0.1,
        pos_grid: int = 14,
    ) -> None:
        if resnet_depth not in RESNET_DEPTHS:
            raise ConfigError("model.resnet_depth", f"must be one of {list(RESNET_DEPTHS)}, got {resnet_depth}")
        require_counts(hidden=hidden, layers=layers, heads=heads, mlp=mlp, pos_grid=pos_grid)
        if hidden % heads:
            raise ConfigError("model.heads", f"hidden ({hidden}) must be divisible by heads ({heads})")
        require_dropout(dropout)
        super().__init__(num_classes, in_channels, band_mean, band_std, resnet_depth=int(resnet_depth),
                         hidden=int(hidden), layers=int(layers), heads=int(heads), mlp=int(mlp),
                         dropout=float(dropout), pos_grid=int(pos_grid))
        self.output_stride = 1
        self.pad_multiple = 16
        self.backbone = ResNet(int(resnet_depth), self.in_channels)
        self.backbone.layer4 = None  # the hybrid stops at 1/16: no parameters for a layer never run
        c1, c2, c3 = self.backbone.out_channels[:3]
        self.patch_embed = nn.Conv2d(c3, int(hidden), 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, int(hidden), int(pos_grid), int(pos_grid)))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_drop = nn.Dropout(float(dropout))
        self.vit = nn.ModuleList(ViTBlock(int(hidden), int(heads), int(mlp), float(dropout)) for _ in range(int(layers)))
        self.vit_norm = nn.LayerNorm(int(hidden), eps=1e-6)
        self.cup = conv_bn_relu(int(hidden), CUP_IN_CHANNELS)
        skips = (c2, c1, 64, 0)  # layer2 at 1/8, layer1 at 1/4, the stem at 1/2, none at full size
        widths = (CUP_IN_CHANNELS, *DECODER_CHANNELS)
        self.decoder = nn.ModuleList(DecoderBlock(widths[i], skips[i], widths[i + 1]) for i in range(len(skips)))
        self.classifier = nn.Conv2d(DECODER_CHANNELS[-1], self.num_classes, 3, padding=1)

    def _stem(self, raw: Tensor) -> Tensor:
        net = self.backbone
        return net.relu(net.bn1(net.conv1(self.prepare_input(raw))))

    def _embed(self, features: Tensor) -> Tensor:
        """``(B, C3, h, w)`` -> tokens ``(B, h*w, D)`` with the position embedding resized to ``h x w``."""
        grid = self.patch_embed(features)
        pos = self.pos_embed
        if tuple(pos.shape[-2:]) != tuple(grid.shape[-2:]):
            pos = F.interpolate(pos, size=tuple(grid.shape[-2:]), mode="bilinear", align_corners=False)
        return self.embed_drop((grid + pos).flatten(2).transpose(1, 2))

    def _transformer(self, tokens: Tensor) -> Tensor:
        for i, block in enumerate(self.vit):
            tokens = self.segment(f"vit.{i}", block, tokens)
        return tokens

    def _cup(self, tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """Final LayerNorm, tokens ``(B, h*w, D)`` back to ``(B, D, h, w)``, 3x3 conv to 512."""
        grid = self.vit_norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, *size)
        return self.cup(grid)

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)`` logits; train: ``dict(logits=(B, K, Hp, Wp), aux=[],
            input_size, padded_size)``.
        """
        input_size, padded = self.sizes(x)
        net = self.backbone
        half = self.segment("stem", self._stem, x)
        quarter = self.segment("layer1", lambda t: net.layer1(net.maxpool(t)), half)
        eighth = self.segment("layer2", net.layer2, quarter)
        sixteenth = self.segment("layer3", net.layer3, eighth)
        grid_size = (int(sixteenth.shape[-2]), int(sixteenth.shape[-1]))
        tokens = self.segment("embed", self._embed, sixteenth)
        tokens = self.segment("vit", self._transformer, tokens)
        y = self.segment("cup", lambda t: self._cup(t, grid_size), tokens)
        for i, skip in enumerate((eighth, quarter, half, None)):
            if skip is None:
                y = self.segment(f"dec{i}", self.decoder[i], y)
            else:
                y = self.segment(f"dec{i}", self.decoder[i], y, skip)
        logits = self.segment("head", self.classifier, y)
        return self.outputs(logits, [], input_size, padded)

    def segment_plan(self, granularity: str) -> list[str]:
        """The CNN's, embedding and decoder segments; the transformer whole (stage) or per layer."""
        vit = ["vit"] if granularity == "stage" else [f"vit.{i}" for i in range(len(self.vit))]
        return ["stem", "layer1", "layer2", "layer3", "embed", *vit, "cup",
                *(f"dec{i}" for i in range(len(self.decoder))), "head"]
