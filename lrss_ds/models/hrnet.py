"""HRNetV2 backbone (W18/W32/W48) with the official parameter names and an output stride of 4 or 8."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import Resize, Segmented

# Stage layout of HRNetV2 (Wang et al., TPAMI 2020), the same for every width:
# (number of HR modules, number of branches, BasicBlocks per branch).
STAGES: dict[str, tuple[int, int, int]] = {"stage2": (1, 2, 4), "stage3": (4, 3, 4), "stage4": (3, 4, 4)}
WIDTHS: tuple[int, ...] = (18, 32, 48)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, relu: bool) -> nn.Sequential:
    """Conv (no bias) + BN (+ ReLU) as in the official transition/fuse layers (indices 0, 1, 2)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck (expansion 4) with the stride on the 3x3 conv (ResNet v1.5).

    Args:
        c_in: input channels.
        planes: inner channels; the output has ``4 * planes``.
        stride: stride of the 3x3 conv and of the 1x1 downsample shortcut.
    """

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, H, W) -> (B, 4 * planes, H / stride, W / stride)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class HighResolutionModule(nn.Module):
    """One HR module: parallel branches of BasicBlocks, then every branch fuses all others.

    Fusion follows HRNetV2 for segmentation: lower-resolution branches are mapped by a 1x1
    conv-BN and upsampled bilinearly (align_corners=False) to the target size; higher ones
    are reduced by chains of stride-2 3x3 conv-BN(-ReLU). The official classification code
    upsamples with nearest neighbour (parameter-free, so the same weights load either way).

    Args:
        channels: channels of each branch, e.g. ``[18, 36, 72]``.
        num_blocks: BasicBlocks per branch.
    """

    def __init__(self, channels: list[int], num_blocks: int) -> None:
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(*[BasicBlock(c) for _ in range(num_blocks)]) for c in channels
        )
        fuse_layers = []
        for i in range(n):
            row: list[nn.Module | None] = []
            for j in range(n):
                if j > i:
                    row.append(_conv_bn(channels[j], channels[i], 1, 1, relu=False))
                elif j == i:
                    row.append(None)  # keeps the official index of every fuse slot
                else:
                    steps = [
                        _conv_bn(channels[j], channels[i] if k == i - j - 1 else channels[j], 3, 2, relu=k < i - j - 1)
                        for k in range(i - j)
                    ]
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse_layers)
        self.relu = nn.ReLU(inplace=True)
        self.resize = Resize()

    def forward(self, *xs: Tensor) -> list[Tensor]:
        """Branch maps ``(B, c_i, H / 2^i, W / 2^i)`` in, the same shapes out (as a list)."""
        xs = tuple(branch(x) for branch, x in zip(self.branches, xs))
        resize = getattr(self, "resize", None) or Resize()  # getattr: models pickled before the slot existed
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, layer in enumerate(row):
                if j == i:
                    continue
                z = layer(xs[j])
                if j > i:
                    z = resize(z, xs[i].shape[-2:])
                y = y + z
            fused.append(self.relu(y))
        return fused


def _transition(pre: list[int], cur: list[int]) -> nn.ModuleList:
    """The official transition layer from ``pre`` branch channels to ``cur`` (None = identity)."""
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            layers.append(_conv_bn(pre[i], c, 3, 1, relu=True) if pre[i] != c else None)
        else:
            steps = [
                _conv_bn(pre[-1], c if k == i - len(pre) else pre[-1], 3, 2, relu=True)
                for k in range(i + 1 - len(pre))
            ]
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNet(Segmented):
    """HRNetV2 backbone returning the four branch maps (no normaliser, no head).

    Layout and parameter names are those of the official HRNet ImageNet classification code
    (HRNet/HRNet-Image-Classification, ``cls_hrnet.py``): ``conv1, bn1, conv2, bn2`` (stem,
    stride 4), ``layer1`` (4 Bottlenecks, 256 channels), ``transition1..3``, ``stage2..4``
    (1/4/3 HR modules of 2/3/4 branches, 4 BasicBlocks each, with ``branches`` and
    ``fuse_layers``). Empty transition/fuse slots are ``None`` entries that still take an
    index, so the official checkpoint loads by name (the classification head's
    ``incre_modules``/``downsamp_modules``/``final_layer``/``classifier`` are not built).

    Output stride 8 is realised by giving layer1's first Bottleneck stride 2 on its 3x3 conv2
    and on its 1x1 downsample shortcut (as ResNet v1.5 does). Strides do not change weight
    shapes, so the ImageNet weights still load; the stem is left untouched because its
    stride-2 convs see the raw bands, and every later layer keeps its pretrained role, only
    at half the resolution. It quarters the memory of all four branches, which is why EHSNet
    uses it for whole 6800x7200 images.

    Segments (names passed to the runner, nested as indented):
    ``stem`` (``stem.conv1`` holding ``input_transform``, ``stem.conv2``; one piece when a
    ``stem_core`` is installed), ``layer1`` (``layer1.0-1`` with ``layer1.0``, ``layer1.1``;
    ``layer1.2-3`` with ``layer1.2``, ``layer1.3``), ``stage2`` (``transition1``, ``stage2.0``),
    ``stage3`` (``transition2``, ``stage3.0..3``), ``stage4`` (``transition3``, ``stage4.0..2``).

    Args:
        width: 18, 32 or 48 (channels of the highest-resolution branch).
        in_channels: input bands.
        output_stride: 4 or 8, the stride of the highest-resolution branch.

    Raises:
        ConfigError: for another width or output stride.
    """

    def __init__(self, width: int = 18, in_channels: int = 3, output_stride: int = 4) -> None:
        super().__init__()
        if width not in WIDTHS:
            raise ConfigError("backbone", f"HRNet width must be one of {list(WIDTHS)}, got {width}")
        if output_stride not in (4, 8):
            raise ConfigError("output_stride", f"HRNet supports 4 or 8, got {output_stride}")
        self.width = width
        self.output_stride = output_stride
        # ``core(x, conv1, bn1, conv2) -> conv2(relu(bn1(conv1(x))))`` replacing the stem's
        # first three layers (the memory layer installs a banded one); None = the layers as they are
        self.stem_core: Callable[[Tensor, nn.Conv2d, nn.BatchNorm2d, nn.Conv2d], Tensor] | None = None
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        first_stride = output_stride // 4
        self.layer1 = nn.Sequential(
            Bottleneck(64, 64, stride=first_stride), *[Bottleneck(256, 64) for _ in range(3)]
        )
        pre = [256]
        for t, (stage, (modules, branches, blocks)) in enumerate(STAGES.items(), start=1):
            cur = [width * 2**b for b in range(branches)]
            setattr(self, f"transition{t}", _transition(pre, cur))
            setattr(self, stage, nn.Sequential(*[HighResolutionModule(cur, blocks) for _ in range(modules)]))
            pre = cur
        self.out_channels: list[int] = pre

    @property
    def total_stride(self) -> int:
        """Stride of the lowest-resolution branch: input sizes must be multiples of it."""
        return self.output_stride * 8

    def _stem_conv1(self, x: Tensor, input_transform: Callable[[Tensor], Tensor] | None) -> Tensor:
        if input_transform is not None:
            x = input_transform(x)
        return self.relu(self.bn1(self.conv1(x)))

    def _stem(self, x: Tensor, input_transform: Callable[[Tensor], Tensor] | None) -> Tensor:
        if getattr(self, "stem_core", None) is not None:  # getattr: models pickled before the slot existed
            # one piece: the core computes conv1 -> bn1 -> relu -> conv2 its own way
            x = input_transform(x) if input_transform is not None else x
            return self.relu(self.bn2(self.stem_core(x, self.conv1, self.bn1, self.conv2)))
        x = self.segment("stem.conv1", lambda t: self._stem_conv1(t, input_transform), x)
        return self.segment("stem.conv2", lambda t: self.relu(self.bn2(self.conv2(t))), x)

    def _layer1_halves(self) -> list[tuple[int, int]]:
        half = (len(self.layer1) + 1) // 2
        return [(0, half), (half, len(self.layer1))]

    def _layer1_blocks(self, first: int, last: int, x: Tensor) -> Tensor:
        for i in range(first, last):
            x = self.segment(f"layer1.{i}", self.layer1[i], x)
        return x

    def _layer1(self, x: Tensor) -> Tensor:
        for first, last in self._layer1_halves():
            x = self.segment(f"layer1.{first}-{last - 1}", lambda t, a=first, b=last: self._layer1_blocks(a, b, t), x)
        return x

    def run_transition(self, t: int, *ins: Tensor) -> list[Tensor]:
        """``transition{t}`` on the branch maps ``ins``: the next stage's branch maps."""
        transition: nn.ModuleList = getattr(self, f"transition{t}")
        # A new branch grows from the lowest-resolution input; old ones map one to one.
        return [
            (ins[min(i, len(ins) - 1)] if layer is None else layer(ins[min(i, len(ins) - 1)]))
            for i, layer in enumerate(transition)
        ]

    def _stage(self, t: int, *xs: Tensor) -> list[Tensor]:
        stage: nn.Sequential = getattr(self, f"stage{t + 1}")
        ys = self.segment(f"transition{t}", lambda *ins: self.run_transition(t, *ins), *xs)
        for m, module in enumerate(stage):
            ys = self.segment(f"stage{t + 1}.{m}", module, *ys)
        return ys

    def after_front(self, *ys: Tensor) -> list[Tensor]:
        """``stage2``'s modules, then stages 3 and 4, on the front's branch maps (``transition1``'s output).

        What a banded eval forward runs after it has made the front (stem, ``layer1``,
        ``transition1``) band by band.
        """
        for module in self.stage2:
            ys = module(*ys)
        for t in (2, 3):
            ys = self._stage(t, *ys)
        return list(ys)

    def forward(self, x: Tensor, input_transform: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        """Compute the four branch maps.

        Args:
            x: ``(B, C, H, W)`` with H, W multiples of ``total_stride`` once
                ``input_transform`` has run (the owning model pads inside it).
            input_transform: applied first, inside the ``stem`` segment (the model's
                normaliser and padding, passed at call time so it is not registered here).

        Returns:
            ``[(B, w, H/os, W/os), (B, 2w, H/2os, ...), (B, 4w, ...), (B, 8w, H/8os, W/8os)]``.
        """
        lowest = math.ceil(x.shape[-2] / self.total_stride) * math.ceil(x.shape[-1] / self.total_stride)
        if self.training and x.shape[0] * lowest == 1:
            # torch's own error here ("Expected more than 1 value per channel") names no size
            raise ValueError(
                f"a {x.shape[-2]}x{x.shape[-1]} training sample (batch 1) is too small for HRNet at output stride "
                f"{self.output_stride}: its 1/{self.total_stride} branch would hold one value per channel, which "
                f"BatchNorm cannot normalise; use samples larger than {self.total_stride} px on a side"
            )
        x = self.segment("stem", self._stem, x, input_transform)
        x = self.segment("layer1", self._layer1, x)
        xs: list[Tensor] = [x]
        for t in (1, 2, 3):
            xs = self.segment(f"stage{t + 1}", lambda *ins, t=t: self._stage(t, *ins), *xs)
        return list(xs)

    def segment_plan(self, granularity: str) -> list[str]:
        """Segment names to checkpoint, in forward order.

        Args:
            granularity: ``"stage"`` (stem, layer1, stage2..4), ``"fine"`` (stem whole,
                layer1 in two halves of two blocks, stages whole) or ``"block"`` (every conv of
                the stem, every layer1 block, every transition and HR module). Measured on
                EHSNet-W18 at 2048 x 2048 fp32 (stop 9): layer1 in one piece recomputed four
                blocks at once (~0.6 GiB above the rest, the step's peak once the LRD was split),
                per block its three extra boundaries (64 MiB each) pushed the saved activations
                past 1/8 of plain training; halves hold one extra boundary and peaked lowest
                (1.54 GiB). The stem stays whole: split, its 64-channel half-resolution boundary
                was held from forward to the end of backward (stop 8); what its recomputation
                costs is removed by a banded stem (``lrss_ds.memory.banded_stem``).

        Returns:
            non-nesting segment names.
        """
        layer1 = [f"layer1.{i}" for i in range(len(self.layer1))]
        stages = [f"stage{t}" for t in (2, 3, 4)]
        if granularity == "stage":
            return ["stem", "layer1", *stages]
        if granularity == "fine":
            halves = [f"layer1.{first}-{last - 1}" for first, last in self._layer1_halves()]
            return ["stem", *halves, *stages]
        if granularity == "block":
            names = ["stem.conv1", "stem.conv2", *layer1]
            for t in (1, 2, 3):
                names.append(f"transition{t}")
                names += [f"stage{t + 1}.{m}" for m in range(len(getattr(self, f"stage{t + 1}")))]
            return names
        raise ConfigError("checkpointing", f"unknown granularity {granularity!r}; use stage, block or fine")


def hrnet_width(backbone: str) -> int:
    """The width of a backbone named ``hrnet_w18`` / ``hrnet_w32`` / ``hrnet_w48``.

    Raises:
        ConfigError: for any other name.
    """
    names = {f"hrnet_w{w}": w for w in WIDTHS}
    if backbone not in names:
        raise ConfigError("backbone", f"unknown backbone {backbone!r}; choose from {sorted(names)}")
    return names[backbone]


def concat_branches(features: list[Tensor], resize: Callable[[Tensor, torch.Size], Tensor] | None = None) -> Tensor:
    """HRNetV2's representation: every branch upsampled to the first one's size, concatenated.

    Args:
        features: ``[(B, c_i, h / 2^i, w / 2^i)]`` branch maps.
        resize: ``resize(x, size)``, the bilinear upsampling (default: :class:`Resize`'s).

    Returns:
        ``(B, sum c_i, h, w)``.
    """
    size = features[0].shape[-2:]
    resize = resize or Resize()
    ups = [features[0]] + [resize(f, size) for f in features[1:]]
    return torch.cat(ups, dim=1)
