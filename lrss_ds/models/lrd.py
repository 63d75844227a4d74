"""The EHSNet long-range dependency (LRD) module: parallel large-kernel convolutions."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import Tensor, nn

from lrss_ds.models.base import SegmentRunner, Segmented, run_directly
from lrss_ds.models.large_kernel import DepthwiseConv2d

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """The activation module called ``name`` (``relu``, ``gelu`` or ``silu``).

    Raises:
        ValueError: unknown name.
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, activation: str | None) -> nn.Sequential:
    """``Conv(K x K, 'same', no bias) -> BN [-> activation]``."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if activation is not None:
        layers.append(make_activation(activation))
    return nn.Sequential(*layers)


class SplitPointwise(nn.Module):
    """A 1x1 convolution over the concatenation of ``parts`` equal-width maps, one 1x1 per map.

    ``conv1x1(cat(x_0, .., x_n))`` equals ``sum_i conv1x1_i(x_i)`` with the weight's column
    blocks: the concatenation is never built, and each term can be computed (and
    checkpointed) on its own. Each part is a module of its own rather than a slice of one
    weight, so that frameworks that act on module calls see every use: ZeRO-3 gathers a
    module's parameters when it is called (a slice of an uncalled module's weight found it
    partitioned), and the memory layer's large-tensor banding replaces module classes.
    Initialised as the single 1x1 would be (uniform, bound ``1 / sqrt(parts * channels)``), and
    a state dict holding the single ``weight`` of that 1x1 loads into the parts.

    Args:
        parts: number of concatenated maps.
        channels: channels of each map.
        out_channels: output channels.
    """

    def __init__(self, parts: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = parts * channels
        self.out_channels = out_channels
        self.terms = nn.ModuleList(nn.Conv2d(channels, out_channels, 1, bias=False) for _ in range(parts))
        bound = 1.0 / math.sqrt(self.in_channels)
        for term in self.terms:
            nn.init.uniform_(term.weight, -bound, bound)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """``sum_i terms[i](maps[i])``: the 1x1 of the maps' concatenation."""
        if len(maps) != len(self.terms):
            raise ValueError(f"SplitPointwise takes {len(self.terms)} maps, got {len(maps)}")
        out = self.terms[0](maps[0])
        for term, x in zip(self.terms[1:], maps[1:]):
            out = out + term(x)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[override]
        joint = state_dict.get(prefix + "weight")
        if joint is not None and joint.shape[1] == self.in_channels:
            # a checkpoint of the single 1x1 (the layout before the split): its column blocks
            del state_dict[prefix + "weight"]
            for i, block in enumerate(joint.chunk(len(self.terms), dim=1)):
                state_dict[f"{prefix}terms.{i}.weight"] = block.contiguous()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class LRDUnit(nn.Module):
    """The LRDU: a dense 5x5 conv and parallel large depth-wise convs fused by concat + 1x1.

    Eq. (1) of the paper, ``f_out = delta(f_in, f_5, f_7, f_15, f_31)`` with ``delta`` =
    concatenation followed by a 1x1 convolution, lists ``f_in`` among the fused terms, so
    the unit's input is concatenated too (it doubles as the identity path). Every branch is
    linear (conv -> BN, no activation, as the large-kernel branches of RepLKNet); the
    activation comes after the fusing 1x1 (conv -> BN -> act). The paper calls the
    branches "depth-wise separable": the depth-wise part is each branch, the point-wise part
    is the shared fusing 1x1.

    Args:
        channels: ``k``, the unit's input and output channels.
        dw_kernels: kernel sizes of the parallel depth-wise convolutions.
        dense_kernel: kernel size of the dense convolution.
        activation: activation after the fusion.
        dw_method: the :class:`DepthwiseConv2d` method (``"auto"`` = fastest exact one).
    """

    def __init__(
        self,
        channels: int,
        dw_kernels: Sequence[int] = (7, 15, 31),
        dense_kernel: int = 5,
        activation: str = "relu",
        dw_method: str = "auto",
    ) -> None:
        super().__init__()
        self.dense = conv_bn(channels, channels, dense_kernel, None)
        self.depthwise = nn.ModuleList(
            nn.Sequential(DepthwiseConv2d(channels, k, bias=False, method=dw_method), nn.BatchNorm2d(channels))
            for k in dw_kernels
        )
        # fuse[0] is the 1x1 over the concatenation of the 2 + n terms, kept per term
        self.fuse = nn.Sequential(
            SplitPointwise(2 + len(dw_kernels), channels, channels),
            nn.BatchNorm2d(channels),
            make_activation(activation),
        )

    @property
    def branch_count(self) -> int:
        """Terms of the fusion: the input, the dense branch and each depth-wise branch."""
        return 2 + len(self.depthwise)

    def fused_branch(self, index: int, x: Tensor) -> Tensor:
        """Branch ``index``'s share of the fusing 1x1 convolution: its part of :class:`SplitPointwise`.

        The fusion never builds the ``(2 + n) k``-channel concatenation; each term can be a
        checkpoint segment of its own, and the unit's backward then holds one branch at a time
        (EHSNet-W18 at 2048 x 2048: the LRD's transient fell from 1.4 to 0.6 GiB).
        """
        if index == 0:
            term = x
        elif index == 1:
            term = self.dense(x)
        else:
            term = self.depthwise[index - 2](x)
        return self.fuse[0].terms[index](term)

    def finish(self, fused: Tensor) -> Tensor:
        """The fusion's BatchNorm and activation, applied to the summed branch terms."""
        return self.fuse[2](self.fuse[1](fused))

    def fused_terms(self, x: Tensor, segment: SegmentRunner | None = None) -> Tensor:
        """The fusing 1x1's output before its BatchNorm: the sum of every branch's term.

        Args:
            x: the unit's input ``(B, k, h, w)``.
            segment: ``segment(name, fn, *args)`` running each term as segment ``"unit.<i>"``;
                ``None`` calls them.
        """
        run = segment or run_directly
        fused: Tensor | None = None
        for index in range(self.branch_count):
            term = run(f"unit.{index}", lambda t, index=index: self.fused_branch(index, t), x)
            fused = term if fused is None else fused + term
        assert fused is not None
        return fused

    def forward(self, x: Tensor) -> Tensor:
        """``(B, k, h, w) -> (B, k, h, w)``."""
        return self.finish(self.fused_terms(x))


class LRDModule(Segmented):
    """1x1 reduce to ``k`` -> activation -> LRDU -> 1x1 up to ``d`` (EHSNet §3.2, Fig. 4).

    Both 1x1 convolutions are conv -> BN -> activation.

    Segments (``segment_prefix`` prepended): ``reduce`` (with the input merge), the unit's
    branch terms ``unit.0`` .. ``unit.<n+1>`` (see :class:`LRDUnit`), then ``increase`` (the
    fusion's BatchNorm and activation with the 1x1 up to ``d``: one segment, so that the
    fusion's output is not one more map held from forward to backward); :meth:`segment_names`
    lists them.

    Args:
        in_channels: channels of the backbone feature map.
        k: channels inside the LRDU (paper: 256).
        d: output channels (paper: 256).
        dw_kernels: depth-wise kernel sizes (paper: 7, 15, 31).
        dense_kernel: dense kernel size (paper: 5).
        activation: ``relu``, ``gelu`` or ``silu``.
        dw_method: the :class:`DepthwiseConv2d` method.
    """

    def __init__(
        self,
        in_channels: int,
        k: int = 256,
        d: int = 256,
        dw_kernels: Sequence[int] = (7, 15, 31),
        dense_kernel: int = 5,
        activation: str = "relu",
        dw_method: str = "auto",
    ) -> None:
        super().__init__()
        self.out_channels = d
        self.reduce = conv_bn(in_channels, k, 1, activation)
        self.unit = LRDUnit(k, dw_kernels, dense_kernel, activation, dw_method)
        self.increase = conv_bn(k, d, 1, activation)

    def segment_names(self) -> list[str]:
        """The module's segment names in forward order, ``segment_prefix`` included."""
        names = ["reduce", *[f"unit.{i}" for i in range(self.unit.branch_count)], "increase"]
        return [self.segment_prefix + name for name in names]

    def forward(self, *inputs: Tensor, merge: Callable[..., Tensor] | None = None) -> Tensor:
        """``(B, Cin, h, w) -> (B, d, h, w)``.

        Args:
            *inputs: one ``(B, Cin, h, w)`` map, or several that ``merge`` turns into one.
            merge: run on ``inputs`` inside the first segment, so that a checkpoint keeps the
                (small) inputs rather than the merged map (EHSNet: upsample + concat of the
                four HRNet branches, 15w channels at the highest resolution).
        """
        if merge is None and len(inputs) != 1:
            raise ValueError(f"LRDModule takes one input map without merge, got {len(inputs)}")

        def reduce(*maps: Tensor) -> Tensor:
            return self.reduce(merge(*maps) if merge is not None else maps[0])

        x = self.segment("reduce", reduce, *inputs)
        fused = self.unit.fused_terms(x, self.segment)
        return self.segment("increase", lambda t: self.increase(self.unit.finish(t)), fused)
