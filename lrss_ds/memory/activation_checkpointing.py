"""Segment runners that checkpoint a model's planned segments, with BatchNorm updated once."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from lrss_ds.errors import ConfigError
from lrss_ds.memory.ledger import SavedTensorLedger


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_batchnorm_statistics(batchnorms: Iterable[_BatchNorm]) -> Iterator[None]:
    """Let BatchNorm layers run in train mode without changing their running statistics.

    Recomputing a checkpointed segment in backward runs its BatchNorm layers a second time;
    in train mode that would update running_mean/var again and double num_batches_tracked.
    Momentum 0 makes the update ``running = 1 * running + 0 * batch`` (a no-op; with
    ``momentum=None`` the factor would be 1/num_batches_tracked instead, so 0 is set either
    way) and the counter is put back afterwards. The normalisation itself still uses the
    batch statistics, so the recomputed activations equal the first forward's.

    Args:
        batchnorms: the layers (typically :func:`batchnorm_modules` of the model).
    """
    saved = []
    for bn in batchnorms:
        count = bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
        saved.append((bn, bn.momentum, count))
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, momentum, count in saved:
            bn.momentum = momentum
            if count is not None:
                bn.num_batches_tracked.copy_(count)


def _to_channels_last(value: Any) -> Any:
    """4-D tensors to ``torch.channels_last`` (a no-op for those already in it)."""
    if isinstance(value, Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def channels_last_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so that its 4-D tensor arguments (also inside lists) arrive channels-last.

    Activations, not parameters, are converted: convolutions give channels-last outputs
    when their input is channels-last, and DeepSpeed cannot take channels-last parameters
    (``deepspeed.initialize`` broadcasts ``p.data.view(torch.uint8)``, which needs a unit
    last stride). The conversion runs inside the segment, so a checkpoint saves the
    caller's tensor (e.g. the raw image the caller holds anyway), not a converted copy.
    """

    def run(*args: Any) -> Any:
        return fn(*pytree.tree_map(_to_channels_last, args))

    return run


def checkpoint_device_type(tensors: Iterable[Tensor]) -> str:
    """The device type whose autocast state a checkpoint keeps for its recomputation.

    As ``torch.utils.checkpoint`` decides it: the non-CPU device type of the checkpointed
    tensors (``cuda`` first when there are several), read when the segment runs, so a model
    moved after it was prepared (``deepspeed.initialize`` moves it to the accelerator) is seen
    where it is; when every tensor is on the host, the accelerator's device type.
    """
    from deepspeed.accelerator import get_accelerator

    types = [t.device.type for t in tensors if t.device.type != "cpu"]
    if "cuda" in types:
        return "cuda"
    return types[0] if types else get_accelerator().device_name()


@dataclass(frozen=True)
class AutocastState:
    """The autocast state of a forward, to put back around its recomputation in backward.

    Kept as ``torch.utils.checkpoint`` keeps it: ``enabled``, ``dtype`` and ``cache_enabled``
    for the checkpoint's device type (where autocast exists for it) and for the CPU, which
    autocast tracks separately even when the device is the CPU.

    Attributes:
        device_type: from :func:`checkpoint_device_type`.
        device: ``torch.amp.autocast`` keyword arguments for ``device_type`` (None where that
            device type has no autocast, e.g. ``meta``).
        cpu: the same for ``"cpu"``.
    """

    device_type: str
    device: dict[str, Any] | None
    cpu: dict[str, Any]

    @staticmethod
    def _of(device_type: str) -> dict[str, Any]:
        return {
            "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type),
            "cache_enabled": torch.is_autocast_cache_enabled(),
        }

    @classmethod
    def capture(cls, device_type: str) -> "AutocastState":
        """The state in effect now (call it in the forward)."""
        device = cls._of(device_type) if torch.amp.is_autocast_available(device_type) else None
        return cls(device_type, device, cls._of("cpu"))

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the body under the captured state, whatever autocast is in effect around it."""
        with contextlib.ExitStack() as stack:
            if self.device is not None:
                stack.enter_context(torch.amp.autocast(self.device_type, **self.device))
            stack.enter_context(torch.amp.autocast("cpu", **self.cpu))
            yield


class _PlanRunner:
    """Base of the segment runners: checkpoint the planned names, run the others directly.

    Args:
        plan: segment names to checkpoint (from ``model.checkpoint_plan(granularity)``).
        batchnorms: BatchNorm layers to freeze during recomputation.
        channels_last: give every segment its 4-D tensor inputs in channels-last layout.

    Attributes:
        seen: planned names that have been checkpointed at least once (``plan - seen`` after
            a forward reveals names the model never uses).
    """

    def __init__(self, plan: Iterable[str], batchnorms: Iterable[_BatchNorm], channels_last: bool = False) -> None:
        self.plan = frozenset(plan)
        self.batchnorms = list(batchnorms)
        self.channels_last = channels_last
        self.seen: set[str] = set()

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.channels_last:
            fn = channels_last_inputs(fn)
        # eval / no_grad forwards build no graph, so there is nothing to recompute
        if name not in self.plan or not torch.is_grad_enabled():
            return fn(*args)
        self.seen.add(name)
        return self.checkpoint(fn, *args)

    def checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def unused_plan_names(self) -> set[str]:
        """Planned names no forward has run yet (a typo in a plan shows up here)."""
        return set(self.plan - self.seen)


class TorchCheckpointRunner(_PlanRunner):
    """Checkpoint planned segments with non-reentrant ``torch.utils.checkpoint``.

    Non-reentrant checkpointing takes any nesting of args and outputs, keeps the RNG and
    autocast state of the first forward for the recomputation, and lets autograd hooks see
    the saved segment inputs (so the ledger counts them and the offload hooks can move them).
    """

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), frozen_batchnorm_statistics(self.batchnorms)

    def checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        return torch_checkpoint(fn, *args, use_reentrant=False, context_fn=self._contexts)


class DeepSpeedCheckpointRunner(_PlanRunner):
    """Checkpoint planned segments with ``deepspeed.checkpointing.checkpoint``.

    This is the runner for ``cpu_checkpointing``: DeepSpeed moves each checkpoint's inputs to
    the host and back (configure it with :func:`configure_deepspeed_checkpointing`). Its
    checkpoint is reentrant and takes positional tensors, so this runner adapts it:

    * args and outputs of any nesting (lists of branch maps) are flattened to tensors and
      rebuilt; non-tensor leaves stay in the closure;
    * DeepSpeed empties the ``.data`` of the tensors it is given (on purpose: to free the
      device copy), which would break a caller that uses the same tensor again (a skip
      connection, a second head); it is given fresh views instead;
    * a dummy input that requires grad makes the outputs require grad even when no input
      does (the first segment takes the raw uint8 image), so the parameters inside get
      gradients;
    * the recomputation in backward runs under the first forward's autocast state (DeepSpeed
      does not restore it; see :class:`AutocastState`) and with frozen BatchNorm statistics.

    DeepSpeed keeps the inputs outside autograd's saved tensors, so the saved-tensor hooks do
    not see them; this runner counts them in ``self.ledger`` (set by ``apply_memory_mode``)
    as offloaded, until DeepSpeed drops them after the segment's backward.

    Args:
        plan: segment names to checkpoint.
        batchnorms: BatchNorm layers to freeze during recomputation.
        channels_last: give every segment its 4-D tensor inputs in channels-last layout.
    """

    def __init__(self, plan: Iterable[str], batchnorms: Iterable[_BatchNorm], channels_last: bool = False) -> None:
        super().__init__(plan, batchnorms, channels_last)
        self.ledger: SavedTensorLedger | None = None

    def checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        from deepspeed.runtime.activation_checkpointing.checkpointing import checkpoint as ds_checkpoint

        leaves, in_spec = pytree.tree_flatten(args)
        tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
        autocast = AutocastState.capture(checkpoint_device_type(leaves[i] for i in tensor_at))
        calls = 0
        out_spec: list[pytree.TreeSpec] = []

        def run(_dummy: Tensor, *tensors: Tensor) -> tuple[Any, ...]:
            nonlocal calls
            calls += 1
            rebuilt = list(leaves)
            for i, t in zip(tensor_at, tensors):
                rebuilt[i] = t
            call_args = pytree.tree_unflatten(rebuilt, in_spec)
            if calls == 1:
                result = fn(*call_args)
            else:  # the recomputation in backward
                with frozen_batchnorm_statistics(self.batchnorms), autocast.restored():
                    result = fn(*call_args)
            out_leaves, spec = pytree.tree_flatten(result)
            out_spec[:] = [spec]
            return tuple(out_leaves)

        dummy = torch.empty(0, requires_grad=True)
        inputs = [leaves[i].view_as(leaves[i]) for i in tensor_at]
        outputs = ds_checkpoint(run, dummy, *inputs)
        if self.ledger is not None:
            for view in inputs:
                if view.is_floating_point():  # what DeepSpeed moves (is_activation_to_checkpoint)
                    nbytes = view.numel() * view.element_size()
                    token = self.ledger.hold(("deepspeed-checkpoint", id(view)), nbytes, offloaded=True)
                    # the view lives in DeepSpeed's ctx until the segment's backward is done
                    weakref.finalize(view, self.ledger.release, token)
        if isinstance(outputs, Tensor) or not isinstance(outputs, tuple):
            outputs = (outputs,)
        return pytree.tree_unflatten(list(outputs), out_spec[0])


def configure_deepspeed_checkpointing(cpu_checkpointing: bool, ds_config: Mapping[str, Any] | None = None) -> None:
    """Apply DeepSpeed's activation checkpointing settings (call after distributed init).

    ``deepspeed.initialize`` does not apply the JSON ``activation_checkpointing`` section by
    itself, so this calls ``deepspeed.checkpointing.configure`` with it.

    On the CPU accelerator ``cpu_checkpointing`` is switched off inside DeepSpeed: there,
    ``tensor.to("cpu")`` returns the same tensor, and DeepSpeed (0.19.8,
    ``get_cpu_activations_for_backward``) first empties the argument's ``.data`` and then
    keeps ``.data`` of that "copy" — the very tensor it just emptied — so backward fails with
    "Expected 3D or 4D input to conv2d, but got input of size: []". The inputs are in host
    memory already, so skipping the move changes nothing else.

    Args:
        cpu_checkpointing: the memory mode's ``cpu_checkpointing``.
        ds_config: the DeepSpeed config dict; its ``activation_checkpointing`` section (if
            any) is applied. ``None`` on the CPU accelerator leaves DeepSpeed's defaults
            (nothing to move), without needing distributed init.

    Raises:
        ConfigError: if the JSON's ``activation_checkpointing.cpu_checkpointing`` disagrees
            with the memory mode.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    section = dict((ds_config or {}).get("activation_checkpointing") or {})
    if "cpu_checkpointing" in section and bool(section["cpu_checkpointing"]) != cpu_checkpointing:
        raise ConfigError(
            "activation_checkpointing.cpu_checkpointing",
            f"is {section['cpu_checkpointing']} in the DeepSpeed config but memory.cpu_checkpointing is "
            f"{cpu_checkpointing}; make them agree",
        )
    on_host = get_accelerator().device_name() == "cpu"
    if ds_config is None and on_host:
        # DeepSpeed's defaults (no move, no partitioning) are already what runs on the host,
        # and configure() would need torch.distributed initialised for its log line
        return
    deepspeed.checkpointing.configure(
        None,
        deepspeed_config=dict(ds_config) if ds_config else None,
        checkpoint_in_cpu=cpu_checkpointing and not on_host,
    )
