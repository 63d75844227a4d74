"""``lrss-ds models``: list every model with its parameter count and GFLOPs at a given size."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from lrss_ds.errors import ConfigError
from lrss_ds.models import MODEL_BUILDERS, build_model
from lrss_ds.sizes import parse_size

# The rows of the listing: (model name, options). The patch and downsampled HRNet-FCN
# baselines are rows of their own because they do different work on the same scene. A model
# without a row here is listed with its default options (``listed_variants``).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("ehsnet", {}),
    ("ehsnet", {"backbone": "hrnet_w48"}),
    ("hrnet_fcn", {"mode": "holistic"}),
    ("hrnet_fcn", {"mode": "patch", "patch_size": 512, "overlap": 64}),
    ("hrnet_fcn", {"mode": "downsampled", "downsample": 4}),
    ("glsnet", {}),
    ("glnet", {}),
    ("isdnet", {}),
    ("stdc", {}),
    ("magnet", {}),
    ("fctl", {}),
    # smp's Segformer is not listed: its MiT encoders read a tensor while being built, which
    # the meta device cannot do.
    ("smp", {"arch": "unet", "encoder": "resnet50"}),
    ("smp", {"arch": "pspnet", "encoder": "resnet50"}),
    ("smp", {"arch": "deeplabv3plus", "encoder": "resnet50"}),
    ("smp", {"arch": "fpn", "encoder": "resnet50"}),
    ("smp", {"arch": "upernet", "encoder": "resnet50"}),
    ("tv_fcn", {"backbone": "resnet50"}),
    ("segnet", {}),
    ("icnet", {}),
]
# Options that change how, not what, a model computes: count the plain convolution (an FFT
# or decomposed depth-wise conv is the same arithmetic function, but the flop counter only
# knows conv and matmul kernels).
COUNTING_OPTIONS: dict[str, dict[str, Any]] = {"ehsnet": {"dw_method": "direct"}}
# A model whose forward reads tensor data (so it cannot run on meta tensors) is counted in a
# real run instead, if the input is at most this many pixels (a few seconds of CPU).
REAL_RUN_PIXELS = 1024 * 1024


def listed_variants() -> list[tuple[str, dict[str, Any]]]:
    """The listing's rows: ``VARIANTS``, then every other ``MODEL_BUILDERS`` model with its defaults."""
    named = {name for name, _ in VARIANTS}
    return VARIANTS + [(name, {}) for name in MODEL_BUILDERS if name not in named]


@dataclass
class ModelCost:
    """Size and arithmetic of one model at one input size.

    Attributes:
        name: model name.
        options: the options it was built with.
        parameters: number of parameters.
        flops: FLOPs of one eval forward of a ``(1, C, H, W)`` input (multiply-add = 2 FLOPs;
            convolutions, matmuls and attention only, as ``torch.utils.flop_counter`` counts;
            patch mode: one patch times the number of patches that tile the scene).
        output_stride: stride of the main logits.
        note: why ``flops`` is missing, if it is.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    parameters: int = 0
    flops: int | None = None
    output_stride: int = 0
    note: str = ""


def patch_count(size: tuple[int, int], patch: tuple[int, int], overlap: int) -> int:
    """Patches of ``patch`` with ``overlap`` needed to cover ``size`` (stride ``patch - overlap``)."""
    counts = []
    for length, p in zip(size, patch):
        counts.append(1 if length <= p else 1 + math.ceil((length - p) / (p - overlap)))
    return counts[0] * counts[1]


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of ``model(x)`` in eval mode as counted by ``FlopCounterMode`` (no grad).

    Args:
        model: on the same device as ``x`` (``meta`` to count a scene without memory).
        x: ``(B, C, H, W)``.

    Returns:
        total FLOPs.
    """
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def model_cost(
    name: str,
    num_classes: int,
    in_channels: int,
    size: tuple[int, int],
    device: str | torch.device = "meta",
    **options: Any,
) -> ModelCost:
    """Parameters and FLOPs of a model at ``size``, by default on the meta device (no memory).

    On ``meta`` every tensor has a shape and no data, so a 6800x7200 scene costs nothing;
    the counter sees the same operators as in a real run (tests check this at a small size).

    Args:
        name: a key of ``MODEL_BUILDERS``.
        num_classes: K.
        in_channels: C.
        size: ``(H, W)``.
        device: ``"meta"`` or a real device.
        **options: model options.

    Returns:
        the :class:`ModelCost`; if the forward cannot run on meta tensors it is counted in a
        real CPU run when the input has at most ``REAL_RUN_PIXELS`` pixels, otherwise
        ``flops`` is None and ``note`` says why.
    """
    build_options = {**options, **COUNTING_OPTIONS.get(name, {})}
    with torch.device(device):
        model = build_model(name, num_classes, in_channels, **build_options)
    cost = ModelCost(name, dict(options), sum(p.numel() for p in model.parameters()), None, model.output_stride)
    height, width = size
    factor = 1
    if getattr(model, "mode", None) == "patch":
        patch = model.patch_size
        factor = patch_count(size, patch, model.overlap)
        height, width = min(height, patch[0]), min(width, patch[1])
    x = torch.zeros(1, in_channels, height, width, device=device)
    try:
        cost.flops = count_flops(model, x) * factor
    except (NotImplementedError, RuntimeError) as error:  # a data-dependent op has no meta kernel
        if str(device) == "meta" and height * width <= REAL_RUN_PIXELS:
            real = model_cost(name, num_classes, in_channels, size, "cpu", **options)
            cost.flops, cost.note = real.flops, "counted in a real CPU run (not countable on meta tensors)"
        else:
            cost.note = f"not countable on {device}: {str(error).splitlines()[0][:80]}"
    return cost


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lrss-ds models``."""
    parser.add_argument("--size", default="6800x7200", help="input size HxW (default: an FBP scene, 6800x7200)")
    parser.add_argument("--bands", type=int, default=4, help="input bands (default 4)")
    parser.add_argument("--classes", type=int, default=24, help="number of classes (default 24, FBP)")


def run(args: argparse.Namespace) -> int:
    """Print one row per model variant: name, options, parameters, output stride, GFLOPs."""
    size = parse_size(args.size)
    print(f"models at {size[0]}x{size[1]}x{args.bands}, {args.classes} classes "
          "(GFLOPs of one eval forward; multiply-add = 2 FLOPs; conv/matmul/attention only; counted on meta tensors;"
          " each model works on its input padded to its stride, and the count includes the padding)")
    print(f"{'model':<10} {'options':<42} {'params (M)':>10} {'os':>3} {'GFLOPs':>10}")
    for name, options in listed_variants():
        if name not in MODEL_BUILDERS:
            continue
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "(defaults)"
        try:
            cost = model_cost(name, args.classes, args.bands, size, **options)
        except ConfigError as error:  # a library model whose package is missing or broken here
            print(f"{name:<10} {shown:<42} {'n/a':>10} {'':>3} {'n/a':>10}  {error}")
            continue
        flops = f"{cost.flops / 1e9:10.1f}" if cost.flops is not None else f"{'n/a':>10}"
        flops += f"  {cost.note}" if cost.note else ""
        print(f"{name:<10} {shown:<42} {cost.parameters / 1e6:10.2f} {cost.output_stride:>3} {flops}")
    return 0
