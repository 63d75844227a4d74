"""Memory levers for whole-scene training: checkpointing, offload, the saved-tensor ledger.

The engine uses four names::

    mode = MemoryMode.from_dict(cfg["memory"])        # or get_memory_mode("ckpt_stage")
    prepare_model(model, mode, ds_config)             # once, before deepspeed.initialize
    ledger = SavedTensorLedger()
    with apply_memory_mode(engine, mode, ledger) as mem:
        with mem.autocast():
            loss = loss_fn(engine(image), label)      # build_loss(..., band_rows=mode.loss_band_rows)
        engine.backward(loss)

Adding a memory lever: give :class:`MemoryMode` (``modes.py``) a field with a default that
changes nothing, and check its value in ``MemoryMode.validate``; the experiment YAML's
``memory:`` section (``lrss_ds.engine.config.MemoryConfig``) is generated from those fields.
Then make it act in ``apply.py``: in :func:`prepare_model` if it changes the model once before
``deepspeed.initialize``, in :func:`apply_memory_mode` if it wraps every step. Name useful
combinations in ``MEMORY_PRESETS``, and give a preset the planner should measure a one-line
summary in ``PLANNED_PRESETS`` beside it: the planner's setups (``PLAN_SETUPS`` in
``lrss_ds/engine/probe.py``, each a preset on a DeepSpeed JSON) and every benchmark's ``--modes``
are derived from that list.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The module each public name lives in, imported on first use: reading an experiment config
# needs only MemoryMode's fields (modes.py, no torch), and a config error should not wait for
# torch to import.
_HOME = {
    "MemoryContext": "apply",
    "apply_memory_mode": "apply",
    "prepare_model": "apply",
    "DeepSpeedCheckpointRunner": "activation_checkpointing",
    "TorchCheckpointRunner": "activation_checkpointing",
    "batchnorm_modules": "activation_checkpointing",
    "configure_deepspeed_checkpointing": "activation_checkpointing",
    "frozen_batchnorm_statistics": "activation_checkpointing",
    "SavedTensorLedger": "ledger",
    "CHECKPOINTING": "modes",
    "MEMORY_PRESETS": "modes",
    "PLANNED_PRESETS": "modes",
    "MemoryMode": "modes",
    "get_memory_mode": "modes",
    "SavedTensorHooks": "offload",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module on first use (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from lrss_ds.memory.apply import MemoryContext, apply_memory_mode, prepare_model
    from lrss_ds.memory.activation_checkpointing import (
        DeepSpeedCheckpointRunner,
        TorchCheckpointRunner,
        batchnorm_modules,
        configure_deepspeed_checkpointing,
        frozen_batchnorm_statistics,
    )
    from lrss_ds.memory.ledger import SavedTensorLedger
    from lrss_ds.memory.modes import CHECKPOINTING, MEMORY_PRESETS, PLANNED_PRESETS, MemoryMode, get_memory_mode
    from lrss_ds.memory.offload import SavedTensorHooks
