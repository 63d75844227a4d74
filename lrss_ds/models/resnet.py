"""ResNet-18/50 feature extractors with torchvision's parameter names and named segments."""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import Segmented

# depth -> (block type, blocks per layer); the torchvision / He et al. layouts.
LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Unlike torchvision, dilation > 1 is allowed, so a dilated ResNet-18 can keep a finer
    output stride; the parameter names are unchanged.

    Args:
        c_in: input channels.
        planes: output channels.
        stride: stride of the first convolution.
        dilation: dilation (and padding) of both 3x3 convolutions.
        downsample: the 1x1 conv + BN projection of the shortcut, or ``None``.
    """

    expansion = 1

    def __init__(
        self,
        c_in: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # torchvision refuses dilation in BasicBlock; allowing it changes no parameter name.
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, H, W) -> (B, planes, H/stride, W/stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, possibly dilated), 1x1 expand, residual (ResNet-50/101, v1.5).

    Args:
        c_in: input channels.
        planes: width of the 3x3 convolution; the output has ``4 * planes`` channels.
        stride: stride of the 3x3 convolution (torchvision's "ResNet v1.5" placement).
        dilation: dilation of the 3x3 convolution.
        downsample: the 1x1 conv + BN projection of the shortcut, or ``None``.
    """

    expansion = 4

    def __init__(
        self,
        c_in: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        """``(B, c_in, H, W) -> (B, 4 * planes, H/stride, W/stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Segmented):
    """ResNet backbone returning the outputs of layer1..layer4 (no pooling, no classifier).

    Parameter names equal torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer2.0.downsample.0`` / ``.1``, ...) so the public ImageNet files load by key name
    (their ``fc.*`` keys are reported as unexpected). Dilation follows torchvision's
    ``replace_stride_with_dilation``: a dilated layer keeps the previous layer's stride and
    multiplies the dilation by the stride it gave up.

    Segments (``segment_prefix`` is prepended to each): ``stem`` (input transform, conv1,
    bn1, relu, maxpool) containing ``stem.conv1`` and ``stem.pool``; ``layer1``..``layer4``,
    each containing its blocks ``layerN.i``.

    Args:
        depth: 18, 34, 50 or 101.
        in_channels: number of input bands; ``conv1`` takes them all.
        replace_stride_with_dilation: three flags for layer2, layer3, layer4.
        zero_init_residual: start every residual branch's last BN at zero (Goyal et al.),
            which makes each block begin as the identity.

    Raises:
        ConfigError: for an unknown depth or a malformed dilation option.
    """

    def __init__(
        self,
        depth: int = 50,
        in_channels: int = 3,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in LAYOUTS:
            raise ConfigError("depth", f"ResNet depth must be one of {sorted(LAYOUTS)}, got {depth}")
        flags = [bool(f) for f in replace_stride_with_dilation]
        if len(flags) != 3:
            raise ConfigError("replace_stride_with_dilation", f"needs 3 flags (layer2..4), got {flags}")
        kind, blocks = LAYOUTS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.in_channels = in_channels
        self.replace_stride_with_dilation = tuple(flags)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self._c_in = 64
        self._dilation = 1
        stride = 4
        self.strides: list[int] = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            dilate = i > 0 and flags[i - 1]
            layer_stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, n, layer_stride, dilate))
            if layer_stride == 2 and not dilate:
                stride *= 2
            self.strides.append(stride)
        self.out_channels: list[int] = [p * block.expansion for p in (64, 128, 256, 512)]
        self._init_weights(zero_init_residual)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        n: int,
        stride: int,
        dilate: bool,
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._c_in != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._c_in, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # As in torchvision, the first block of a dilated layer still runs at the previous
        # dilation (it is the one that used to stride); the rest use the new one.
        layers = [block(self._c_in, planes, stride, previous_dilation, downsample)]
        self._c_in = planes * block.expansion
        layers += [block(self._c_in, planes, 1, self._dilation) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    @property
    def output_stride(self) -> int:
        """Stride of layer4's output (32 without dilation, 16 or 8 with)."""
        return self.strides[-1]

    def _stem_conv1(self, x: Tensor, input_transform: Callable[[Tensor], Tensor] | None) -> Tensor:
        if input_transform is not None:
            x = input_transform(x)
        return self.relu(self.bn1(self.conv1(x)))

    def _stem(self, x: Tensor, input_transform: Callable[[Tensor], Tensor] | None) -> Tensor:
        x = self.segment("stem.conv1", lambda t: self._stem_conv1(t, input_transform), x)
        return self.segment("stem.pool", self.maxpool, x)

    def _layer(self, index: int, x: Tensor) -> Tensor:
        for i, block in enumerate(getattr(self, f"layer{index}")):
            x = self.segment(f"layer{index}.{i}", block, x)
        return x

    def forward(self, x: Tensor, input_transform: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
        """Compute the four layer outputs.

        Args:
            x: ``(B, C, H, W)``; after ``input_transform`` H and W should be multiples of 32
                (any size runs, but then strides are rounded up by the convolutions).
            input_transform: applied first, inside the ``stem`` segment (the owning model's
                normaliser/padding, passed at call time so it is not registered here).

        Returns:
            ``[(B, c1, H/s1, W/s1), ..., (B, c4, H/s4, W/s4)]`` with channels
            ``out_channels`` (64..512 for ResNet-18, 256..2048 for ResNet-50) and strides
            ``strides`` (4, 8, 16, 32 without dilation).
        """
        x = self.segment("stem", self._stem, x, input_transform)
        features: list[Tensor] = []
        for index in (1, 2, 3, 4):
            x = self.segment(f"layer{index}", lambda t, index=index: self._layer(index, t), x)
            features.append(x)
        return features

    def segment_plan(self, granularity: str) -> list[str]:
        """Segment names to checkpoint, in forward order, with ``segment_prefix`` prepended.

        Args:
            granularity: ``"stage"`` (stem, layer1..4), ``"fine"`` (stem split into
                ``stem.conv1`` and ``stem.pool``, layer1 per block, layer2..4 whole) or
                ``"block"`` (stem split, every block of every layer).

        Returns:
            non-nesting segment names; the first one holds the input transform.

        Raises:
            ConfigError: for an unknown granularity.
        """
        def blocks(index: int) -> list[str]:
            return [f"layer{index}.{i}" for i in range(len(getattr(self, f"layer{index}")))]

        if granularity == "stage":
            names = ["stem", "layer1", "layer2", "layer3", "layer4"]
        elif granularity == "fine":
            names = ["stem.conv1", "stem.pool", *blocks(1), "layer2", "layer3", "layer4"]
        elif granularity == "block":
            names = ["stem.conv1", "stem.pool", *blocks(1), *blocks(2), *blocks(3), *blocks(4)]
        else:
            raise ConfigError("checkpointing", f"unknown granularity {granularity!r}; use stage, block or fine")
        return [self.segment_prefix + n for n in names]
