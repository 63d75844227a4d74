"""Turn a model into its spatial version: halo convolutions, scene-wide BatchNorm, halo resampling."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from lrss_ds.errors import ConfigError
from lrss_ds.models.base import Resize, SegmentationModel, crop_to, run_directly
from lrss_ds.models.ecr import ECRModule
from lrss_ds.models.large_kernel import DepthwiseConv2d
from lrss_ds.parallel.batchnorm import SpatialBatchNorm2d
from lrss_ds.parallel.group import SpatialGroup
from lrss_ds.parallel.attention import SpatialECR
from lrss_ds.parallel.halo import HaloConv2d, HaloDepthwiseConv2d, SpatialResize

SUPPORTED: tuple[str, ...] = ("hrnet_fcn", "ehsnet")
"""Models whose every cross-row operation has a spatial version (others are refused)."""

OPTION = "parallel.spatial"


def refusal(model: nn.Module, option: str = OPTION, one_rank: str = f"set {OPTION}: 1") -> str | None:
    """Why ``model`` cannot run split into bands, or None.

    Args:
        model: the built network.
        option: the setting that asks for bands, as the message names it (the experiment's key,
            or ``lrss-ds predict``'s ``--spatial``).
        one_rank: how to ask for one rank with that setting.
    """
    name = getattr(model, "name", type(model).__name__)
    if name not in SUPPORTED:
        return f"model {name!r} has no spatial version yet (supported: {list(SUPPORTED)}); {one_rank}"
    if getattr(model, "mode", "holistic") != "holistic":
        return f"{name} mode {model.mode!r} pools its input across rows; use mode holistic or {one_rank}"
    if any(getattr(m, "_segment_runner", run_directly) is not run_directly for m in model.modules()):
        return "spatialize the model before the memory layer installs checkpointing (it freezes the BatchNorm layers it finds)"
    if any(getattr(m, "stem_core", None) is not None for m in model.modules()):
        return f"the banded stem (memory.banded_stem) does not split over ranks; turn it off or {one_rank}"
    return None


def _swap(module: nn.Module, group: SpatialGroup) -> None:
    for name, child in module.named_children():
        if isinstance(child, (HaloConv2d, HaloDepthwiseConv2d, SpatialBatchNorm2d, SpatialResize, SpatialECR)):
            continue
        if isinstance(child, nn.Conv2d):
            setattr(module, name, HaloConv2d.from_conv(child, group))
        elif type(child) is nn.BatchNorm2d:
            setattr(module, name, SpatialBatchNorm2d.from_batchnorm(child, group))
        elif isinstance(child, Resize):
            setattr(module, name, SpatialResize(group))
        elif type(child) is DepthwiseConv2d:
            setattr(module, name, HaloDepthwiseConv2d.from_depthwise(child, group))
        elif type(child) is ECRModule:
            setattr(module, name, SpatialECR.from_ecr(child, group))
        else:
            _swap(child, group)


def spatialize(
    model: SegmentationModel, group: SpatialGroup, option: str = OPTION, one_rank: str = f"set {OPTION}: 1"
) -> SegmentationModel:
    """Make ``model`` (in place) compute on one band of a scene, with the group's other bands.

    Every ``Conv2d`` becomes a :class:`HaloConv2d`, every ``BatchNorm2d`` a
    :class:`SpatialBatchNorm2d`, every :class:`Resize` a :class:`SpatialResize`, the LRD's
    depth-wise convolutions :class:`HaloDepthwiseConv2d` and EHSNet's ECR a
    :class:`SpatialECR`; they keep
    the model's parameters and buffers (the state dict is unchanged). A forward pre-hook tells
    the group each forward's band heights. Each rank then gets its band of the scene
    (:func:`band_bounds` with ``model.pad_multiple``); the train-mode output holds the band's
    logits, ``input_size`` / ``padded_size`` being the band's, and the eval-mode output the
    band's rows of the one-rank logits (upsampled with row halos, :func:`_band_outputs`).

    Args:
        model: a model in :data:`SUPPORTED`, on this rank.
        group: the spatial group (its ``pad_multiple`` is set to the model's).
        option, one_rank: the setting a refusal names and how to ask for one rank (:func:`refusal`).

    Returns:
        ``model``.

    Raises:
        ConfigError: (key ``option``) the model has an operation with no spatial version.
    """
    problem = refusal(model, option, one_rank)
    if problem is not None:
        raise ConfigError(option, problem)
    group.pad_multiple = model.pad_multiple
    _swap(model, group)

    def begin(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        group.begin(int(args[0].shape[-2]))

    model.register_forward_pre_hook(begin)
    _band_outputs(model, group)
    return model


def _band_outputs(model: SegmentationModel, group: SpatialGroup) -> None:
    """Make the eval forward upsample the band's logits with row halos (a collective).

    The model's own eval output interpolates its band alone, so the rows next to a band
    boundary would be clamped at the boundary instead of reading the neighbour's logits. The
    train-mode dict (and ``defer_upsampling``, whose caller upsamples) is left as it is.
    """
    resize = SpatialResize(group)
    one_rank_outputs = model.outputs

    def outputs(logits: Tensor, aux: list[Tensor], input_size: tuple[int, int], padded: tuple[int, int]) -> object:
        if model.training or model.defer_upsampling:
            return one_rank_outputs(logits, aux, input_size, padded)
        return crop_to(resize(logits, padded), input_size)

    model.outputs = outputs  # type: ignore[method-assign]


def gradient_sum(model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> None:
    """Replace each parameter's gradient by ``reduce(grad)`` (e.g. the sum over the spatial group).

    Each rank holds its band's share of every parameter gradient; their sum is the scene's.
    """
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.copy_(reduce(parameter.grad))


def parameters_equal(model: nn.Module, other: nn.Module) -> bool:
    """Whether two models hold the same parameter values (e.g. after a step on each rank)."""
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
