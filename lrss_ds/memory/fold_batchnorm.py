"""Eval-mode BatchNorm folded into the convolution that feeds it, for the duration of a prediction.

In eval mode ``bn(conv(x)) = gamma * (W * x + b - mean) / sqrt(var + eps) + beta`` is the
convolution with weight ``s * W`` and bias ``s * (b - mean) + beta`` (``s = gamma / sqrt(var +
eps)`` per output channel): the same function up to float rounding, one pass over the map fewer.
Measured on EHSNet-W18 holistic prediction at 2048 x 2048 (fp32, one thread, shared machine),
``native_batch_norm`` took 4.5 % of the time (``benchmarks/inference_profile.py --ops``).

Which BatchNorm follows which convolution is read from the model's own forward, not from its
class: :func:`folded_batchnorm` runs it once on a small example with hooks on every
``nn.Conv2d``, :class:`~lrss_ds.models.large_kernel.DepthwiseConv2d` and ``nn.BatchNorm2d``,
and folds a pair when every call of the BatchNorm received the very tensor a call of that
convolution returned, and every call's output of the convolution went to that BatchNorm. Layers that
compute outside their modules (the banded stem reads ``conv1``'s weight directly) are never
called as modules, so they are left alone. The folded model is then run on the example again
and compared with the unfolded output; a difference beyond float rounding (a convolution's
output also read by something else than its BatchNorm) raises instead of predicting wrong maps.

The original weights stay (they come back on exit), so where the folded ones live is the
caller's choice. ``per_call=True`` makes a convolution's folded weight for each of its calls
and drops it after: no second copy of the weights, one multiply over a weight per call; right
for a model called once per scene (holistic prediction), whose maps dwarf that multiply.
``per_call=False`` keeps a folded copy of every folded weight for the whole context: right for
many calls on small inputs (sliding windows), where the per-call multiply costs more than the
BatchNorm pass it saves. Measured with ``benchmarks/_workloads.py``'s ``infer`` (memory_time's
inference probe: one fresh process, one thread, peak RSS from ``VmHWM``): GLSNet on a whole
1024 x 1024 scene (135 MiB of folded weights) peaked at 760 MiB with kept copies, 610 MiB per
call and 588-604 MiB unfolded (7.7-8.3 CPU-s folded either way, 6.9-7.5 unfolded); patch HRNet
in 64 px windows over 512 x 512 took 5.6 CPU-s and 392-398 MiB with kept copies, 6.9-7.1 CPU-s
per call and 5.8-5.9 CPU-s (355 MiB) unfolded.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from lrss_ds.models.large_kernel import DepthwiseConv2d

CONVOLUTIONS = (nn.Conv2d, DepthwiseConv2d)


def find_conv_bn_pairs(model: nn.Module, run: Callable[[], Any]) -> list[tuple[nn.Module, nn.BatchNorm2d]]:
    """The (convolution, BatchNorm) pairs where the BatchNorm only ever normalises that convolution's output.

    Args:
        model: an eval-mode model.
        run: calls ``model`` once (on a small example).

    Returns:
        the pairs, in the order the BatchNorms first ran.
    """
    produced: dict[int, nn.Module] = {}  # id of a convolution's output tensor -> the convolution
    keep_alive: list[Tensor] = []  # so that ids are not reused by later tensors within the run
    fed: dict[nn.Module, set[nn.Module | None]] = {}  # BatchNorm -> convolutions whose outputs it read
    feeds: dict[nn.Module, set[nn.Module | None]] = {}  # convolution -> BatchNorms that read its output
    calls: dict[nn.Module, int] = {}  # convolution -> its calls
    normalised: dict[nn.Module, int] = {}  # convolution -> calls whose output a BatchNorm read
    handles = []

    def after_conv(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[module] = calls.get(module, 0) + 1
        if isinstance(output, Tensor):
            produced[id(output)] = module
            keep_alive.append(output)
            feeds.setdefault(module, set())

    def before_bn(module: nn.Module, inputs: Any) -> None:
        source = produced.pop(id(inputs[0]), None) if inputs and isinstance(inputs[0], Tensor) else None
        fed.setdefault(module, set()).add(source)
        if source is not None:
            feeds[source].add(module)
            normalised[source] = normalised.get(source, 0) + 1

    for module in model.modules():
        if isinstance(module, CONVOLUTIONS):
            handles.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_bn))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for bn, sources in fed.items():
        if len(sources) != 1 or None in sources:
            continue
        (conv,) = sources
        # every call of the convolution normalised by this BatchNorm, and only by it
        if feeds[conv] == {bn} and normalised.get(conv) == calls[conv] and bn.running_mean is not None:
            pairs.append((conv, bn))
    return pairs


def _fold_factors(conv: nn.Module, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(scale, bias)`` of ``bn(conv(.))`` folded: its weight is ``conv.weight * scale``.

    Returns:
        ``scale`` in float64, shaped to broadcast over the weight (``(C_out, 1, ..., 1)``), and
        the folded ``bias (C_out,)``, computed in float64, in the weight's dtype.
    """
    weight = conv.weight
    scale = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    return scale.view(-1, *([1] * (weight.dim() - 1))), bias.to(weight.dtype)


def _fold_weight_per_call(conv: nn.Module, scale: Tensor) -> Callable[[], None]:
    """Make every call of ``conv`` use ``weight * scale``, made for that call and dropped after it.

    Args:
        conv: the convolution; its ``weight`` parameter is swapped during each call only.
        scale: float64 ``(C_out, 1, ..., 1)``; multiplied in the weight's dtype (within a
            rounding of the float64 product, far inside the fold's check).

    Returns:
        the undo: removes the hooks and puts the original parameter back.
    """
    original = conv._parameters["weight"]
    scale = scale.to(original.dtype)

    def before(module: nn.Module, inputs: Any) -> None:
        module._parameters["weight"] = nn.Parameter(original * scale, requires_grad=False)

    def after(module: nn.Module, inputs: Any, output: Any) -> None:
        module._parameters["weight"] = original

    handles = [conv.register_forward_pre_hook(before), conv.register_forward_hook(after, always_call=True)]

    def undo() -> None:
        for handle in handles:
            handle.remove()
        conv._parameters["weight"] = original

    return undo


@contextlib.contextmanager
def folded_batchnorm(
    model: nn.Module, run: Callable[[], Any], check: Callable[[Any, Any], bool], *, per_call: bool = True
) -> Iterator[int]:
    """Within the context, every eval BatchNorm that only follows one convolution is folded into it.

    Every parameter and forward is put back on exit (the same tensor objects: a model
    trained afterwards is untouched).

    Args:
        model: an eval-mode model.
        run: calls ``model`` once on a small example and returns its output; run before and
            after folding.
        check: ``check(unfolded_output, folded_output)`` -> True when they agree to the
            precision's rounding.
        per_call: where the folded weights live (module docstring): made for each call and
            dropped after it (no second copy of the weights), or, when False, one folded copy
            of every folded weight kept for the whole context beside the originals.

    Yields:
        the number of BatchNorms folded.

    Raises:
        RuntimeError: ``model`` is in train mode, or the folded output disagrees with the
            unfolded one.
    """
    if model.training:
        raise RuntimeError("folded_batchnorm needs an eval-mode model; call model.eval() first")
    restore: list[Callable[[], None]] = []
    try:
        with torch.no_grad():
            holder: dict[str, Any] = {}
            pairs = find_conv_bn_pairs(model, lambda: holder.setdefault("out", run()))
            for conv, bn in pairs:
                scale, bias = _fold_factors(conv, bn)
                if per_call:
                    restore.append(_fold_weight_per_call(conv, scale))
                else:
                    weight = (conv.weight.double() * scale).to(conv.weight.dtype)
                    restore.append(_swap_parameter(conv, "weight", nn.Parameter(weight, requires_grad=False)))
                restore.append(_swap_parameter(conv, "bias", nn.Parameter(bias, requires_grad=False)))
                bn.forward = _identity  # type: ignore[method-assign]
                restore.append(lambda bn=bn: delattr(bn, "forward"))
            if pairs and not check(holder["out"], run()):
                raise RuntimeError(
                    f"folding {len(pairs)} BatchNorms of {type(model).__name__} into their convolutions changed its "
                    "output beyond rounding: a convolution's output is read by more than its BatchNorm"
                )
        yield len(pairs)
    finally:
        for undo in reversed(restore):
            undo()


def _identity(x: Tensor) -> Tensor:
    return x


def _swap_parameter(module: nn.Module, name: str, value: nn.Parameter) -> Callable[[], None]:
    """Set ``module.<name>`` to ``value`` (registering it as a parameter); return how to undo that exactly."""
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = value

        def undo() -> None:
            module._parameters[name] = old
    else:  # a plain ``None`` attribute (DepthwiseConv2d(bias=False))
        old_attr = module.__dict__.pop(name)
        module._parameters[name] = value

        def undo() -> None:
            del module._parameters[name]
            module.__dict__[name] = old_attr
    return undo


__all__ = ["CONVOLUTIONS", "find_conv_bn_pairs", "folded_batchnorm"]
