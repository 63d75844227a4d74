"""STDC (Short-Term Dense Concatenate) backbone and the STDC-Seg network with its detail head.

Fan et al., "Rethinking BiSeNet For Real-time Semantic Segmentation", CVPR 2021; the EHSNet
paper's Table 1 "STDC" row. The backbone (:class:`STDCNet`) is also ISDNet's shallow branch
(:mod:`lrss_ds.models.isdnet`).

What is the same as the paper (STDC1 layout unless ``backbone="stdc2"``):

* Stem: two 3x3 stride-2 conv-BN-ReLU (``base / 2``, ``base`` channels); then stages 3, 4, 5
  of STDC modules (2, 2, 2 for STDC1; 4, 5, 3 for STDC2) with ``4 * base``, ``8 * base``,
  ``16 * base`` channels at strides 8, 16, 32.
* STDC module (4 blocks): a 1x1 conv to ``out / 2``, then 3x3 convs to ``out / 4``,
  ``out / 8``, ``out / 8``, every block's output concatenated (``out`` channels). A stride-2
  module puts a depth-wise 3x3 stride-2 conv + BN after the first block and average-pools the
  first block's output (3x3, stride 2) for the concatenation.
* Segmentation (BiSeNet-style decoder): a global-context vector of the stride-32 map, an
  attention refinement module (ARM) on the stride-32 and stride-16 maps, nearest upsampling
  with 3x3 conv-BN-ReLU heads to 128 channels, a feature fusion module (FFM) of the stride-8
  map with the context path, a 3x3 + 1x1 output head (256 channels) and two auxiliary heads
  (64 channels) on the context path at strides 8 and 16; a detail head (64 channels, 1 output)
  on the stride-8 map trained by the detail aggregation loss (``build_loss("stdc")``,
  :mod:`lrss_ds.models.aux_losses`).
* Parameter names of the backbone equal the official STDC ImageNet files' (``features.0.conv``,
  ``features.2.conv_list.1.bn``, ``features.2.avd_layer.0``), so those files load by key name.

Where the paper is vague or does not fit, and what is done here:

* **No BatchNorm on pooled vectors.** The official ARM normalises its pooled ``1 x 1``
  attention vector with BatchNorm, and the global-context conv too; with one whole scene per
  step (batch 1) BatchNorm in training cannot normalise a single value per channel. Those two
  1x1 convolutions have a bias instead.
* **Plain cross-entropy** for the segmentation terms (the official training uses OHEM
  cross-entropy); the losses' presets decide, the model only returns the maps.
* Bilinear upsampling of the logits (``align_corners=False``) as every model here does.

Outputs (train mode): main logits at stride 8; aux = [context-path logits at stride 8,
context-path logits at stride 16]; ``detail`` = detail logits ``(B, 1, Hp/8, Wp/8)`` when
``use_detail``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import SegmentationModel, Segmented

# name -> STDC modules per stage (stages 3, 4, 5), the paper's STDC1 and STDC2.
LAYOUTS: dict[str, tuple[int, ...]] = {"stdc1": (2, 2, 2), "stdc2": (4, 5, 3)}


class ConvX(nn.Module):
    """Conv (no bias, 'same' padding) -> BN -> ReLU; STDC's basic layer (names ``conv``, ``bn``).

    Args:
        c_in: input channels.
        c_out: output channels.
        kernel: kernel size.
        stride: stride.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, H, W) -> (B, c_out, H/stride, W/stride)``."""
        return self.relu(self.bn(self.conv(x)))


class STDCModule(nn.Module):
    """The STDC module with concatenation (the paper's Fig. 3b/c, "CatBottleneck" in the official code).

    Args:
        c_in: input channels.
        c_out: output channels (a multiple of ``2 ** (blocks - 1)``).
        blocks: convolution blocks (paper 4).
        stride: 1 or 2.
    """

    def __init__(self, c_in: int, c_out: int, blocks: int = 4, stride: int = 1) -> None:
        super().__init__()
        if blocks < 2 or c_out % (2 ** (blocks - 1)):
            raise ConfigError("stdc", f"an STDC module needs >= 2 blocks and channels divisible by {2 ** (blocks - 1)}, got {blocks}/{c_out}")
        self.stride = stride
        widths = [c_out // 2] + [c_out // 2 ** (i + 1) for i in range(1, blocks - 1)] + [c_out // 2 ** (blocks - 1)]
        self.conv_list = nn.ModuleList([ConvX(c_in, widths[0], kernel=1)])
        for i in range(1, blocks):
            self.conv_list.append(ConvX(widths[i - 1], widths[i], kernel=3))
        if stride == 2:
            half = c_out // 2
            self.avd_layer = nn.Sequential(nn.Conv2d(half, half, 3, 2, 1, groups=half, bias=False), nn.BatchNorm2d(half))
            self.skip = nn.AvgPool2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, H, W) -> (B, c_out, H/stride, W/stride)``."""
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        parts = [self.skip(first) if self.stride == 2 else first]
        for conv in self.conv_list[1:]:
            out = conv(out)
            parts.append(out)
        return torch.cat(parts, dim=1)


class STDCNet(Segmented):
    """The STDC backbone: stem (strides 2, 4) and stages of STDC modules, returning each stage's map.

    Segments (``segment_prefix`` prepended): ``stem`` containing ``stem.conv1`` (holding the
    input transform) and ``stem.conv2``; ``stage3``.. each containing its modules ``stageN.i``.

    Args:
        in_channels: input channels.
        layers: STDC modules per stage, from stage 3 (STDC1: ``(2, 2, 2)``; ISDNet's shallow
            branch: ``(2, 2)``, strides 8 and 16).
        base: stem width (paper 64); stage ``i`` has ``base * 2 ** (i + 2)`` channels.
        blocks: blocks per STDC module (paper 4).

    Raises:
        ConfigError: empty ``layers`` or a width the modules cannot split.
    """

    def __init__(self, in_channels: int, layers: Sequence[int] = (2, 2, 2), base: int = 64, blocks: int = 4) -> None:
        super().__init__()
        if not layers or min(layers) < 1 or base < 2:
            raise ConfigError("stdc", f"layers must be >= 1 modules per stage and base >= 2, got {list(layers)}/{base}")
        features: list[nn.Module] = [ConvX(in_channels, base // 2, 3, 2), ConvX(base // 2, base, 3, 2)]
        self.stage_ends: list[int] = []
        c_in = base
        for i, count in enumerate(layers):
            c_out = base * 2 ** (i + 2)
            for j in range(count):
                features.append(STDCModule(c_in if j == 0 else c_out, c_out, blocks, 2 if j == 0 else 1))
            c_in = c_out
            self.stage_ends.append(len(features))
        self.features = nn.Sequential(*features)
        self.out_channels: list[int] = [base * 2 ** (i + 2) for i in range(len(layers))]
        self.strides: list[int] = [2 ** (i + 3) for i in range(len(layers))]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage_range(self, stage: int) -> range:
        start = 2 if stage == 0 else self.stage_ends[stage - 1]
        return range(start, self.stage_ends[stage])

    def _stem(self, x: Tensor, input_transform: Any) -> Tensor:
        def conv1(t: Tensor) -> Tensor:
            return self.features[0](input_transform(t) if input_transform is not None else t)

        x = self.segment("stem.conv1", conv1, x)
        return self.segment("stem.conv2", self.features[1], x)

    def _stage(self, stage: int, x: Tensor) -> Tensor:
        for i, index in enumerate(self._stage_range(stage)):
            x = self.segment(f"stage{stage + 3}.{i}", self.features[index], x)
        return x

    def forward(self, x: Tensor, input_transform: Any = None) -> list[Tensor]:
        """Compute every stage's output.

        Args:
            x: ``(B, C, H, W)``, H and W multiples of the last stride after ``input_transform``.
            input_transform: applied first, inside ``stem.conv1`` (the owner's normaliser).

        Returns:
            ``[(B, out_channels[i], H / strides[i], W / strides[i]) for each stage]``.
        """
        x = self.segment("stem", self._stem, x, input_transform)
        features = []
        for stage in range(len(self.stage_ends)):
            x = self.segment(f"stage{stage + 3}", lambda t, stage=stage: self._stage(stage, t), x)
            features.append(x)
        return features

    def segment_plan(self, granularity: str) -> list[str]:
        """``stage``: stem and whole stages; ``fine``: stem split, first stage per module, others whole; ``block``: every module."""
        stages = [f"stage{i + 3}" for i in range(len(self.stage_ends))]

        def modules(stage: int) -> list[str]:
            return [f"stage{stage + 3}.{i}" for i in range(len(self._stage_range(stage)))]

        if granularity == "stage":
            names = ["stem", *stages]
        elif granularity == "fine":
            names = ["stem.conv1", "stem.conv2", *modules(0), *stages[1:]]
        elif granularity == "block":
            names = ["stem.conv1", "stem.conv2", *[n for s in range(len(stages)) for n in modules(s)]]
        else:
            raise ConfigError("checkpointing", f"unknown granularity {granularity!r}; use stage, block or fine")
        return [self.segment_prefix + n for n in names]


class OutputHead(nn.Module):
    """3x3 conv-BN-ReLU to ``hidden`` channels, then a 1x1 conv to ``outputs`` (BiSeNet's output head).

    Args:
        c_in: input channels.
        hidden: hidden channels.
        outputs: output maps (classes, or 1 for the detail head).
        bias: give the final 1x1 a bias (the official STDC head has none).
    """

    def __init__(self, c_in: int, hidden: int, outputs: int, bias: bool = False) -> None:
        super().__init__()
        self.conv = ConvX(c_in, hidden, 3)
        self.conv_out = nn.Conv2d(hidden, outputs, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, h, w) -> (B, outputs, h, w)``."""
        return self.conv_out(self.conv(x))


class ChannelAttention(nn.Module):
    """3x3 conv-BN-ReLU and the channel logits ``1x1(mean over positions)`` (a bias, no BN: batch 1).

    Args:
        c_in: input channels.
        c_out: output channels.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = ConvX(c_in, c_out, 3)
        self.conv_atten = nn.Conv2d(c_out, c_out, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, c_in, h, w) -> (features (B, c_out, h, w), logits (B, c_out, 1, 1))``."""
        feat = self.conv(x)
        return feat, self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))


class AttentionRefinement(ChannelAttention):
    """ARM: the features of :class:`ChannelAttention` weighted by the sigmoid of its channel logits."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """``(B, c_in, h, w) -> (B, c_out, h, w)``."""
        feat, logits = super().forward(x)
        return feat * torch.sigmoid(logits)


class FeatureFusion(nn.Module):
    """FFM: concatenate, 1x1 conv-BN-ReLU, then ``feat + feat * sigmoid(1x1(relu(1x1(mean))))``.

    Args:
        c_in: channels of the concatenation.
        c_out: output channels (the squeeze is ``c_out / 4``).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.convblk = ConvX(c_in, c_out, 1)
        self.conv1 = nn.Conv2d(c_out, max(1, c_out // 4), 1, bias=False)
        self.conv2 = nn.Conv2d(max(1, c_out // 4), c_out, 1, bias=False)

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        """``(B, c_s, h, w), (B, c_c, h, w) -> (B, c_out, h, w)`` with ``c_s + c_c = c_in``."""
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        weights = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat + feat * weights


def _up_nearest(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="nearest")


class STDCSeg(SegmentationModel):
    """STDC-Seg: STDC backbone, BiSeNet-style context path (ARM, FFM), output, auxiliary and detail heads.

    See the module docstring for the architecture and the choices made.

    Segments: the backbone's (see :class:`STDCNet`, the stem holding the normaliser), then
    ``context`` (global vector, ARMs, the two context heads), ``ffm``, ``head`` and, in
    training, ``aux_heads`` and ``detail_head``.

    Args:
        num_classes: K.
        in_channels: input bands.
        band_mean: per-band mean for the normaliser.
        band_std: per-band std for the normaliser.
        backbone: ``stdc1`` (the paper's STDC1-Seg; default) or ``stdc2``.
        base: the backbone's stem width (paper 64).
        context_channels: width of the context path (paper 128).
        use_detail: build the detail head (its loss is the ``stdc`` loss's ``detail_weight``).

    Raises:
        ConfigError: unknown backbone or a bad width.
    """

    name = "stdc"
    output_stride = 8
    pad_multiple = 32

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        backbone: str = "stdc1",
        base: int = 64,
        context_channels: int = 128,
        use_detail: bool = True,
    ) -> None:
        if backbone not in LAYOUTS:
            raise ConfigError("backbone", f"unknown STDC backbone {backbone!r}; choose from {sorted(LAYOUTS)}")
        if int(context_channels) < 4:
            raise ConfigError("context_channels", f"must be >= 4, got {context_channels}")
        super().__init__(num_classes, in_channels, band_mean, band_std, backbone=backbone, base=int(base),
                         context_channels=int(context_channels), use_detail=bool(use_detail))
        self.backbone = STDCNet(in_channels, LAYOUTS[backbone], int(base))
        c8, c16, c32 = self.backbone.out_channels
        width = int(context_channels)
        self.conv_avg = nn.Conv2d(c32, width, 1)
        self.arm32 = AttentionRefinement(c32, width)
        self.arm16 = AttentionRefinement(c16, width)
        self.conv_head32 = ConvX(width, width, 3)
        self.conv_head16 = ConvX(width, width, 3)
        self.ffm = FeatureFusion(c8 + width, 2 * width)
        self.conv_out = OutputHead(2 * width, 2 * width, num_classes)
        self.conv_out16 = OutputHead(width, max(1, width // 2), num_classes)
        self.conv_out32 = OutputHead(width, max(1, width // 2), num_classes)
        self.conv_out_sp8 = OutputHead(c8, max(1, width // 2), 1) if use_detail else None

    def _context(self, feat16: Tensor, feat32: Tensor, size8: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The context path: ``(feat_cp8 (B, w, h/8), feat_cp16 (B, w, h/16))``."""
        global_context = F.relu(self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True)))
        up32 = self.conv_head32(_up_nearest(self.arm32(feat32) + global_context, feat16.shape[-2:]))
        up16 = self.conv_head16(_up_nearest(self.arm16(feat16) + up32, size8))
        return up16, up32

    def forward(self, x: Tensor) -> Tensor | dict[str, Any]:
        """Segment ``x (B, C, H, W)``; see :class:`SegmentationModel` for the output contract.

        Returns:
            eval: ``(B, K, H, W)``; train: the dict with ``logits (B, K, Hp/8, Wp/8)``, ``aux``
            (context logits at strides 8 and 16) and, with ``use_detail``, ``detail (B, 1, Hp/8, Wp/8)``.
        """
        input_size, padded = self.sizes(x)
        feat8, feat16, feat32 = self.backbone(x, input_transform=self.prepare_input)
        size8 = (int(feat8.shape[-2]), int(feat8.shape[-1]))
        feat_cp8, feat_cp16 = self.segment("context", lambda a, b: self._context(a, b, size8), feat16, feat32)
        fused = self.segment("ffm", self.ffm, feat8, feat_cp8)
        logits = self.segment("head", self.conv_out, fused)
        if not self.training:
            return self.outputs(logits, [], input_size, padded)
        aux = self.segment("aux_heads", lambda a, b: [self.conv_out16(a), self.conv_out32(b)], feat_cp8, feat_cp16)
        out = self.outputs(logits, aux, input_size, padded)
        if self.conv_out_sp8 is not None:
            out["detail"] = self.segment("detail_head", self.conv_out_sp8, feat8)  # type: ignore[index]
        return out

    def segment_plan(self, granularity: str) -> list[str]:
        """The backbone's plan, then ``context``, ``ffm``, ``head``, ``aux_heads`` (and ``detail_head``)."""
        tail = ["context", "ffm", "head", "aux_heads"] + (["detail_head"] if self.conv_out_sp8 is not None else [])
        return [*self.backbone.segment_plan(granularity), *tail]
