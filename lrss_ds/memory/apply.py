"""Put a memory mode into effect: prepare the model once, then wrap each forward and backward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from lrss_ds.errors import ConfigError, TrainingError
from lrss_ds.memory.activation_checkpointing import (
    DeepSpeedCheckpointRunner,
    TorchCheckpointRunner,
    batchnorm_modules,
    configure_deepspeed_checkpointing,
)
from lrss_ds.memory.banded_stem import install_stem_banding
from lrss_ds.memory.large_conv import install_large_conv_banding
from lrss_ds.memory.ledger import SavedTensorLedger
from lrss_ds.memory.modes import MemoryMode
from lrss_ds.memory.offload import SavedTensorHooks

_PREPARED_ATTR = "_lrss_memory_mode"
_RUNNER_ATTR = "_lrss_memory_runner"


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DeepSpeed engine (or DDP) wrapper."""
    return getattr(model, "module", model)


def _device_type(model: nn.Module) -> str:
    """The device type of the model's parameters now (read per step: ``deepspeed.initialize`` moves them)."""
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def prepare_model(
    model: nn.Module, mode: MemoryMode, ds_config: Mapping[str, Any] | None = None
) -> TorchCheckpointRunner | DeepSpeedCheckpointRunner | None:
    """Prepare a model for a memory mode, once, before ``deepspeed.initialize``.

    Makes every ``nn.Conv2d`` run in row bands when its tensors pass 2 GiB on the CPU
    (:mod:`lrss_ds.memory.large_conv`), with ``stem_band_rows`` runs every HRNet stem in bands
    (:mod:`lrss_ds.memory.banded_stem`), and installs the segment runner that checkpoints the segments of
    ``model.checkpoint_plan(mode.checkpointing)`` and, with ``channels_last``, hands every
    segment its 4-D inputs in channels-last layout (activations only: DeepSpeed refuses
    channels-last parameters; see :func:`channels_last_inputs`). With ``cpu_checkpointing`` it also applies
    DeepSpeed's activation checkpointing settings, which needs distributed init done (the
    engine's ``deepspeed.init_distributed`` comes first).

    Args:
        model: a ``SegmentationModel`` (anything with ``checkpoint_plan`` and Segmented parts).
        mode: the memory mode.
        ds_config: the DeepSpeed config dict, for its ``activation_checkpointing`` section.

    Returns:
        the installed runner (``None`` without checkpointing); its ``unused_plan_names()``
        after a training forward lists plan names the model never ran.

    Raises:
        ConfigError: if checkpointing is asked of a model without ``checkpoint_plan``, or the
            DeepSpeed config disagrees with the mode (``cpu_checkpointing``, ``bf16`` enabled
            together with ``mode.bf16``, ZeRO stage 3 with ``stem_band_rows``).
    """
    from lrss_ds.models.base import set_segment_runner

    mode.validate()
    if mode.bf16 and ((ds_config or {}).get("bf16") or {}).get("enabled"):
        # autocast over bf16 weights gains nothing and DeepSpeed's bf16 (on CPU, with
        # buffer_dtype bf16) keeps BatchNorm running statistics in bf16, which hurt eval here
        raise ConfigError(
            "bf16.enabled",
            "memory.bf16 runs bf16 autocast over float32 weights (BatchNorm statistics stay float32); "
            "use a DeepSpeed config without bf16 enabled",
        )
    zero_stage = int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)
    if mode.stem_band_rows is not None and zero_stage == 3:
        # the banded stem reads conv1/bn1/conv2's parameters without calling those modules, and
        # ZeRO-3 gathers a module's partitioned parameters only when the module is called
        raise ConfigError(
            "memory.stem_band_rows",
            "cannot be combined with ZeRO stage 3 (the banded stem uses the stem's parameters outside their "
            "modules' calls); use ZeRO stage 2 or set memory.stem_band_rows to null",
        )
    model = _unwrap(model)
    # Whole-scene tensors pass oneDNN's 2 GiB limit, past which its weight gradient crawls
    # (see lrss_ds.memory.large_conv); any mode may meet them, so every mode bands them.
    install_large_conv_banding(model)
    install_stem_banding(model, mode.stem_band_rows)
    runner: TorchCheckpointRunner | DeepSpeedCheckpointRunner | None = None
    if mode.checkpointing != "none":
        if not hasattr(model, "checkpoint_plan"):
            raise ConfigError("memory.checkpointing", f"{type(model).__name__} has no checkpoint_plan; use 'none'")
        plan = model.checkpoint_plan(mode.checkpointing)
        if mode.cpu_checkpointing:
            configure_deepspeed_checkpointing(True, ds_config)
            runner = DeepSpeedCheckpointRunner(plan, batchnorm_modules(model), mode.channels_last)
        else:
            runner = TorchCheckpointRunner(plan, batchnorm_modules(model), mode.channels_last)
    elif mode.channels_last:  # a runner that checkpoints nothing, only converts layouts
        runner = TorchCheckpointRunner((), (), channels_last=True)
    set_segment_runner(model, runner)
    setattr(model, _PREPARED_ATTR, mode)
    setattr(model, _RUNNER_ATTR, runner)
    return runner


@dataclass
class MemoryContext:
    """What :func:`apply_memory_mode` yields: the mode, the ledger and the autocast to use.

    Attributes:
        mode: the memory mode in effect.
        ledger: the ledger counting this step's saved tensors (``None`` if not counting).
        device_type: autocast device type (``"cpu"``, ``"cuda"``, ...).
    """

    mode: MemoryMode
    ledger: SavedTensorLedger | None
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        """Wrap the forward and the loss in this (bf16 autocast, or nothing), not the backward.

        Returns:
            ``torch.autocast(device_type, torch.bfloat16)`` if ``mode.bf16``, else a no-op.
        """
        if not self.mode.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)


@contextlib.contextmanager
def apply_memory_mode(
    model: nn.Module, mode: MemoryMode, ledger: SavedTensorLedger | None = None
) -> Iterator[MemoryContext]:
    """Context for one training step's forward, loss and backward under a memory mode.

    Installs the saved-tensor hooks (counting into ``ledger``, offloading if
    ``mode.offload_saved_tensors``) and starts the ledger's peaks afresh. Use::

        with apply_memory_mode(model, mode, ledger) as mem:
            with mem.autocast():
                outputs = engine(image)
                loss = loss_fn(outputs, label)   # loss built with band_rows=mode.loss_band_rows
            engine.backward(loss)
        log(ledger.summary())

    Args:
        model: the model (or the DeepSpeed engine wrapping it) given to :func:`prepare_model`.
        mode: the memory mode; must be the one the model was prepared with.
        ledger: counts saved-tensor bytes on device / offloaded; ``None`` = no counting.

    Yields:
        a :class:`MemoryContext`.

    Raises:
        TrainingError: if the model was not prepared with ``mode``.
    """
    inner = _unwrap(model)
    prepared = getattr(inner, _PREPARED_ATTR, None)
    if prepared != mode:
        raise TrainingError(
            "memory",
            f"model prepared for {prepared} but stepped with {mode}; call prepare_model(model, mode) "
            "once before deepspeed.initialize",
        )
    runner = getattr(inner, _RUNNER_ATTR, None)
    if ledger is not None:
        ledger.reset_peaks()
    context = MemoryContext(mode, ledger, _device_type(inner))
    use_hooks = ledger is not None or mode.offload_saved_tensors
    if isinstance(runner, DeepSpeedCheckpointRunner):
        runner.ledger = ledger
    try:
        if use_hooks:
            with SavedTensorHooks(ledger, mode.offload_saved_tensors).installed():
                yield context
        else:
            yield context
    finally:
        if isinstance(runner, DeepSpeedCheckpointRunner):
            runner.ledger = None
