"""The base every segmentation model shares: input normalisation, segments, padding and outputs."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.errors import ConfigError

SegmentRunner = Callable[..., Any]
"""``runner(name: str, fn: Callable, *args) -> Any``: runs (or checkpoints) one segment."""

GRANULARITIES: tuple[str, ...] = ("stage", "block", "fine")


def run_directly(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """The default segment runner: call ``fn(*args)`` and ignore the name."""
    return fn(*args)


class InputNormalizer(nn.Module):
    """Convert raw bands of any dtype to float32 and normalise them per band.

    The band statistics are buffers, so they travel inside the model's state dict and a
    checkpoint alone is enough to run the model on raw imagery.

    Args:
        in_channels: number of bands C.
        mean: per-band mean (C values) in the raw units of the input; ``None`` means 0.
        std: per-band standard deviation (C values); ``None`` means 1. Values <= 0 are refused.

    Raises:
        ConfigError: if ``mean``/``std`` do not have C values or a std is not positive.
    """

    def __init__(
        self,
        in_channels: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        # Validate as Python floats so that building on the meta device (to count FLOPs)
        # never reads tensor data.
        mean_v = [0.0] * in_channels if mean is None else [float(v) for v in mean]
        std_v = [1.0] * in_channels if std is None else [float(v) for v in std]
        for key, values in (("band_mean", mean_v), ("band_std", std_v)):
            if len(values) != in_channels:
                raise ConfigError(key, f"needs {in_channels} values (one per band), got {len(values)}")
        if any(not v > 0 for v in std_v):
            raise ConfigError("band_std", f"every value must be > 0, got {std_v}")
        mean_t = torch.tensor(mean_v, dtype=torch.float32)
        std_t = torch.tensor(std_v, dtype=torch.float32)
        self.register_buffer("mean", mean_t.clone())
        self.register_buffer("std", std_t.clone())

    def forward(self, x: Tensor) -> Tensor:
        """Normalise raw bands.

        Args:
            x: ``(B, C, H, W)`` uint8, uint16, int or float tensor.

        Returns:
            ``(B, C, H, W)`` float32 ``(x - mean) / std`` (bf16 runs use autocast, which
            casts at the convolutions, so the normalised input itself stays float32).
        """
        x = x.to(torch.float32)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class Segmented(nn.Module):
    """A module whose forward is cut into named segments (the checkpoint boundaries).

    ``self.segment(name, fn, *args)`` runs ``fn(*args)`` through the segment runner set by
    :func:`set_segment_runner`; the default runner just calls it. The memory layer installs a
    runner that wraps the names of its checkpoint plan in activation checkpointing.
    Set ``segment_prefix`` when one model holds two Segmented children that would otherwise
    use the same names (e.g. two backbones).
    """

    segment_prefix: str = ""

    def __init__(self) -> None:
        super().__init__()
        self._segment_runner: SegmentRunner = run_directly

    def segment(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one named segment.

        Args:
            name: dotted segment name, e.g. ``"stage2.0"`` (``segment_prefix`` is prepended).
            fn: the computation; it should take tensors as ``args`` and use no other
                tensors that require grad except parameters, so that it can be recomputed.
            *args: the segment's inputs.

        Returns:
            whatever ``fn(*args)`` returns.
        """
        return self._segment_runner(self.segment_prefix + name, fn, *args)


def set_segment_runner(model: nn.Module, runner: SegmentRunner | None) -> None:
    """Install ``runner`` on every :class:`Segmented` module in ``model`` (``None``: the default).

    Args:
        model: a model or any module containing Segmented modules.
        runner: ``runner(name, fn, *args) -> fn's result``.
    """
    for module in model.modules():
        if isinstance(module, Segmented):
            module._segment_runner = runner if runner is not None else run_directly


def pad_to_multiple(x: Tensor, multiple: int, value: float = 0.0) -> Tensor:
    """Pad the bottom and right of ``x`` so that H and W are multiples of ``multiple``.

    Args:
        x: ``(B, C, H, W)``.
        multiple: the stride the network needs the size to divide by.
        value: the constant fill (0 after normalisation = the band mean).

    Returns:
        ``(B, C, Hp, Wp)`` with ``Hp = ceil(H / multiple) * multiple``; ``x`` itself if no
        padding is needed.
    """
    height, width = x.shape[-2:]
    hp, wp = padded_size((height, width), multiple)
    if (hp, wp) == (height, width):
        return x
    return F.pad(x, (0, wp - width, 0, hp - height), value=value)


def padded_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """``(ceil(H / multiple) * multiple, ceil(W / multiple) * multiple)`` for ``size=(H, W)``."""
    return (math.ceil(size[0] / multiple) * multiple, math.ceil(size[1] / multiple) * multiple)


def crop_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop ``(..., Hp, Wp)`` to its top-left ``(..., H, W)`` with ``size=(H, W)``."""
    return x[..., : size[0], : size[1]]


def upsample_logits(logits: Tensor, padded: tuple[int, int], input_size: tuple[int, int]) -> Tensor:
    """Upsample logits bilinearly to the padded input size, then crop to the input size.

    This is the one place that defines how network-resolution logits map to pixels; the
    losses and the eval-mode forward both use it so training and prediction agree.

    Args:
        logits: ``(B, K, h, w)`` at the network's output stride (``h = Hp / os``).
        padded: ``(Hp, Wp)``, the padded input size the network saw.
        input_size: ``(H, W)``, the original input size (``H <= Hp``, ``W <= Wp``).

    Returns:
        ``(B, K, H, W)`` logits.
    """
    if tuple(logits.shape[-2:]) != tuple(padded):
        logits = F.interpolate(logits, size=tuple(padded), mode="bilinear", align_corners=False)
    return crop_to(logits, input_size)


class Resize(nn.Module):
    """Bilinear resizing (align_corners=False) as a module, so that a model's resampling can be swapped.

    Spatial parallelism (``lrss_ds.parallel``) replaces it with a version that reads the rows
    it needs across band boundaries; a plain function call inside a forward could not be.
    """

    def forward(self, x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """``(B, C, h, w) -> (B, C, *size)``."""
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegHead(nn.Module):
    """A light per-pixel head: 1x1 conv-BN-ReLU then 1x1 to classes (HRNetV2's head when ``channels`` equals ``in_channels``).

    The paper does not specify its heads; 1x1 convolutions keep them cheap at whole-scene
    size (a 3x3 head on 256 channels would cost ~0.9 TFLOP per 6800x7200 scene alone).

    Args:
        in_channels: input channels.
        num_classes: K.
        channels: hidden channels.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, h, w) -> (B, K, h, w)``."""
        return self.classifier(self.relu(self.bn(self.conv(x))))


def _plain(value: Any) -> Any:
    """Tuples to lists (recursively) so a config dumps with ``yaml.safe_dump`` and JSON."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class SegmentationModel(Segmented):
    """Base class of every model: normaliser, options, padding and the train/eval output contract.

    Subclasses set ``name`` (the key in ``MODEL_BUILDERS``), ``output_stride`` (stride of the
    main logits) and ``pad_multiple`` (what H and W are padded to), call
    ``self.normalizer`` inside their first segment, and implement ``segment_plan``.

    Forward contract: input ``(B, C, H, W)`` of any size and dtype. In eval mode the model
    returns logits ``(B, K, H, W)``; in train mode ``dict(logits=(B, K, h, w),
    aux=[(B, K, h', w'), ...], input_size=(H, W), padded_size=(Hp, Wp))`` — use
    :meth:`outputs` to build either. A model may add train-mode keys that its loss's auxiliary
    terms read (ISDNet: ``sr``, ``affinity``; STDC: ``detail``; see ``lrss_ds.models.aux_losses``).

    Args:
        num_classes: K.
        in_channels: C, the number of input bands.
        band_mean: per-band mean for the normaliser (raw units), ``None`` = 0.
        band_std: per-band std for the normaliser, ``None`` = 1.
        **options: the model's own options, recorded for :meth:`config`.
    """

    name: ClassVar[str] = "base"
    output_stride: int = 4
    pad_multiple: int = 32
    # Set while predicting by lrss_ds.memory.banded_inference: the eval forward then returns the
    # train-mode dict (logits at the output stride) and the caller upsamples them in row bands.
    defer_upsampling: bool = False

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        band_mean: Sequence[float] | None = None,
        band_std: Sequence[float] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ConfigError("num_classes", f"must be >= 1, got {num_classes}")
        if int(in_channels) < 1:
            raise ConfigError("in_channels", f"must be >= 1, got {in_channels}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.normalizer = InputNormalizer(self.in_channels, band_mean, band_std)
        self._options: dict[str, Any] = dict(options)

    def config(self) -> dict[str, Any]:
        """``dict(name, num_classes, in_channels, **options)``: ``build_model(**config)`` rebuilds
        the architecture (band statistics travel in the state dict, not here)."""
        return _plain(
            {"name": self.name, "num_classes": self.num_classes, "in_channels": self.in_channels, **self._options}
        )

    def prepare_input(self, x: Tensor) -> Tensor:
        """Normalise and pad raw input; call it inside the first segment.

        Padding after normalisation with 0 fills the margin with the band mean, which
        disturbs the features near the bottom/right edge least.

        Args:
            x: ``(B, C, H, W)`` raw bands, any dtype.

        Returns:
            ``(B, C, Hp, Wp)`` float32, ``Hp``/``Wp`` multiples of ``pad_multiple``.
        """
        return pad_to_multiple(self.normalizer(x), self.pad_multiple)

    def sizes(self, x: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(input_size, padded_size)`` of ``x (B, C, H, W)`` for this model."""
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        return input_size, padded_size(input_size, self.pad_multiple)

    def outputs(
        self,
        logits: Tensor,
        aux: list[Tensor],
        input_size: tuple[int, int],
        padded: tuple[int, int],
    ) -> Tensor | dict[str, Any]:
        """Shape the forward's result by mode.

        Args:
            logits: ``(B, K, h, w)`` main logits at the output stride.
            aux: auxiliary logits ``[(B, K, h', w'), ...]`` (dropped in eval mode).
            input_size: ``(H, W)``.
            padded: ``(Hp, Wp)``.

        Returns:
            eval: ``(B, K, H, W)`` logits; train (or eval with ``defer_upsampling``): the dict
            of the forward contract.
        """
        if self.training or self.defer_upsampling:
            return {"logits": logits, "aux": list(aux), "input_size": input_size, "padded_size": padded}
        return upsample_logits(logits, padded, input_size)

    def checkpoint_plan(self, granularity: str) -> set[str]:
        """Names of the non-nesting segments to checkpoint at ``granularity``.

        Args:
            granularity: ``"stage"``, ``"block"`` or ``"fine"`` (between the two; each
                model's ``segment_plan`` says what it splits).

        Returns:
            segment names; the first segment of the forward (holding the normaliser) is
            always in the plan.

        Raises:
            ConfigError: for an unknown granularity.
        """
        if granularity not in GRANULARITIES:
            raise ConfigError("checkpointing", f"unknown granularity {granularity!r}; use one of {list(GRANULARITIES)}")
        return set(self.segment_plan(granularity))

    def segment_plan(self, granularity: str) -> list[str]:
        """The segment names of a plan, in forward order (subclasses implement this)."""
        raise NotImplementedError


def require_counts(**options: Any) -> None:
    """Refuse any of ``options`` (name=value) that is not an integer >= 1.

    Raises:
        ConfigError: naming ``model.<name>`` of the first bad option.
    """
    for key, value in options.items():
        if int(value) != value or value < 1:
            raise ConfigError(f"model.{key}", f"must be an integer >= 1, got {value}")


def require_dropout(dropout: float) -> None:
    """Refuse a dropout probability outside [0, 1) (``model.dropout``)."""
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {dropout}")


def refuse_unknown_options(model_class: type, options: Mapping[str, Any]) -> None:
    """Refuse ``options`` that ``model_class``'s constructor does not take, listing those it does.

    The constructor's first parameters (``self, num_classes, in_channels, band_mean, band_std``)
    are not options.

    Raises:
        ConfigError: naming ``model.options.<key>`` of the first unknown option.
    """
    known = set(list(inspect.signature(model_class.__init__).parameters)[5:])
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"model.options.{unknown[0]}", f"unknown {model_class.__name__} option; known: {sorted(known)}"
        )
