"""The planner's probe and the benchmarks measure the trainer's own step, with their measurements around it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lrss_ds.engine.setup import StepParts
from lrss_ds.memory import MemoryMode, SavedTensorLedger, prepare_model
from tests.engine.test_engine_units import StandInEngine, TinySegmenter

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _parts() -> StepParts:
    model = TinySegmenter()
    mode = MemoryMode()
    prepare_model(model, mode)

    def loss_fn(outputs: dict, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs["logits"], target.long())

    return StepParts(engine=StandInEngine(model), loss_fn=loss_fn, memory_mode=mode, ledger=SavedTensorLedger())


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 255, (1, 2, 8, 8), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 3, (1, 8, 8), generator=g, dtype=torch.uint8)}


def _count_trainer_steps(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Make ``trainer.train_step`` record each batch it is given (and still run)."""
    import lrss_ds.engine.trainer as trainer

    seen: list[dict[str, Any]] = []
    real = trainer.train_step

    def recording(parts: Any, batch: dict[str, Any]) -> float | None:
        seen.append(batch)
        return real(parts, batch)

    monkeypatch.setattr(trainer, "train_step", recording)
    return seen


def test_probe_times_the_trainers_step_once_per_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine.probe import measure_steps

    seen = _count_trainer_steps(monkeypatch)
    parts = _parts()
    batches = [_batch(0), _batch(1)]
    result = measure_steps(parts, batches, steps=3)
    assert seen == batches * 3  # one trainer step per micro-batch, every timed pass
    assert parts.engine.global_steps == 6
    assert result["optimizer_steps_per_image"] == 2 and len(result["step_s"]) == 3
    assert result["simulated_device_peak_bytes"] > 0 and result["device_peak_bytes"] is None
    assert result["loss"] == result["loss"]  # the trainer's step returned a finite loss


def test_fullscene_phase_clock_times_the_trainers_step_and_restores_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(BENCH))
    import fullscene_train

    from lrss_ds.engine import trainer

    seen = _count_trainer_steps(monkeypatch)
    parts = _parts()
    with fullscene_train.phase_clock(parts.engine) as marks:
        loss = trainer.train_step(parts, _batch(0))
    assert loss is not None and len(seen) == 1
    assert marks["start"] <= marks["backward"] <= marks["step"] <= marks["end"]
    assert "backward" not in vars(parts.engine) and "step" not in vars(parts.engine)
    assert parts.engine.global_steps == 1


def test_plan_setups_follow_the_planned_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine import probe
    from lrss_ds.memory.modes import MEMORY_PRESETS, PLANNED_PRESETS

    assert set(PLANNED_PRESETS) <= set(MEMORY_PRESETS)
    assert list(probe.PLAN_SETUPS) == ["none", "ckpt_stage", "ckpt_offload", "zero2_offload", "zero3_offload",
                                       "fullres_fp32", "fullres_bf16"]
    # A preset added to PLANNED_PRESETS is a setup of its own on the CPU JSON, in its place.
    monkeypatch.setattr(probe, "PLANNED_PRESETS", {**PLANNED_PRESETS, "ckpt_block": "checkpoint every block"})
    setups = probe._plan_setups()
    assert list(setups)[-1] == "ckpt_block"
    assert setups["ckpt_block"] == probe.PlanSetup("ckpt_block", "ckpt_block", probe.CPU_DS_CONFIG,
                                                   "checkpoint every block")
