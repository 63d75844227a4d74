"""Memory levers for whole-scene training: checkpointing, offload, the saved-tensor ledger.

The engine uses four names::

    mode = MemoryMode.from_dict(cfg["memory"])        # or get_memory_mode("ckpt_stage")
    prepare_model(model, mode, ds_config)             # once, before deepspeed.initialize
    ledger = SavedTensorLedger()
    with apply_memory_mode(engine, mode, ledger) as mem:
        with mem.autocast():
            loss = loss_fn(engine(image), label)      # build_loss(..., band_rows=mode.loss_band_rows)
        engine.backward(loss)
"""

from __future__ import annotations

from lrss_ds.memory.apply import MemoryContext, apply_memory_mode, prepare_model
from lrss_ds.memory.checkpointing import (
    DeepSpeedCheckpointRunner,
    TorchCheckpointRunner,
    batchnorm_modules,
    configure_deepspeed_checkpointing,
    frozen_batchnorm_statistics,
)
from lrss_ds.memory.ledger import SavedTensorLedger
from lrss_ds.memory.modes import CHECKPOINTING, MEMORY_PRESETS, MemoryMode, get_memory_mode
from lrss_ds.memory.offload import SavedTensorHooks

__all__ = [
    "CHECKPOINTING",
    "MEMORY_PRESETS",
    "DeepSpeedCheckpointRunner",
    "MemoryContext",
    "MemoryMode",
    "SavedTensorHooks",
    "SavedTensorLedger",
    "TorchCheckpointRunner",
    "apply_memory_mode",
    "batchnorm_modules",
    "configure_deepspeed_checkpointing",
    "frozen_batchnorm_statistics",
    "get_memory_mode",
    "prepare_model",
]
