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


def test_step_phases_mark_forward_backward_and_step_of_the_trainers_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine import trainer
    from lrss_ds.engine.step_phases import step_phases

    seen = _count_trainer_steps(monkeypatch)
    parts = _parts()
    ended: list[str] = []
    with step_phases(parts.engine, ended.append):
        trainer.train_step(parts, _batch(0))
        trainer.train_step(parts, _batch(1))  # a second micro-batch: phases cycle again
    assert len(seen) == 2
    assert ended == ["forward", "backward", "step"] * 2
    assert "backward" not in vars(parts.engine) and "step" not in vars(parts.engine)
    assert parts.engine.global_steps == 2


def test_step_phases_end_a_forward_that_is_dropped_before_backward() -> None:
    from lrss_ds.engine import trainer
    from lrss_ds.engine.step_phases import step_phases

    parts = _parts()
    parts.loss_fn = lambda outputs, target: outputs["logits"].sum() * float("nan")
    ended: list[str] = []
    with step_phases(parts.engine, ended.append):
        assert trainer.train_step(parts, _batch(0)) is None  # a non-finite loss drops the micro-batch
    assert ended == ["forward"]


class _AllocatingEngine(StandInEngine):
    """A stand-in engine whose backward touches ``extra`` bytes for a moment (a phase with a larger peak)."""

    def __init__(self, module: torch.nn.Module, extra: int) -> None:
        super().__init__(module)
        self.extra = extra

    def backward(self, loss: torch.Tensor) -> None:
        scratch = torch.ones(self.extra // 4, dtype=torch.float32)  # ones: every page resident
        del scratch
        super().backward(loss)


def test_probe_peaks_per_phase_see_which_phase_holds_more(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine.isolated import PROCESS_PEAK_KEY
    from lrss_ds.engine.probe import measure_steps
    from lrss_ds.engine.resident_memory import PeakMemory

    if PeakMemory().source != "VmHWM":
        pytest.skip("no resettable high-water mark here")
    extra = 256 << 20
    parts = _parts()
    parts.engine = _AllocatingEngine(parts.engine.module, extra)
    result = measure_steps(parts, [_batch(0)], steps=2)
    rss = result["phase_rss_peak_bytes"]
    assert set(rss) == {"forward", "backward", "step"}
    # the backward's scratch is seen in its phase only: the high-water mark restarts between phases
    assert rss["backward"] - max(rss["forward"], rss["step"]) > 0.8 * extra
    assert result[PROCESS_PEAK_KEY] >= rss["backward"]
    device = result["phase_simulated_device_peak_bytes"]
    assert set(device) == {"forward", "backward", "step"}
    assert device["backward"] - device["forward"] > 0.99 * extra  # the simulator counts the scratch too
    assert result["simulated_device_peak_bytes"] == max(device.values())


def test_phase_peaks_time_and_peak_the_trainers_step(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine import trainer
    from lrss_ds.engine.step_phases import PhasePeaks, step_phases

    seen = _count_trainer_steps(monkeypatch)
    parts = _parts()
    phases = PhasePeaks(parts.engine.device)
    with step_phases(parts.engine, phases):
        loss = trainer.train_step(parts, _batch(0))
    assert loss is not None and len(seen) == 1
    assert set(phases.seconds) == {"forward", "backward", "step"} and min(phases.seconds.values()) >= 0
    if phases.rss.source == "VmHWM":
        assert set(phases.rss_bytes) == {"forward", "backward", "step"}
        assert phases.process_peak_bytes >= max(phases.rss_bytes.values())
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


def test_phase_peaks_read_and_reset_the_engines_cuda_device_per_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine.step_phases import PhasePeaks

    calls: list[tuple[str, Any]] = []
    peaks = iter([100, 300, 200, 400])  # allocated, reserved per phase
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("allocated", device)) or next(peaks))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: calls.append(("reserved", device)) or next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    device = torch.device("cuda", 1)  # the engine's device, not the current one
    phases = PhasePeaks(device)
    phases("forward")
    phases("backward")
    assert calls == [("allocated", device), ("reserved", device), ("reset", device)] * 2
    assert phases.accelerator_bytes == {"forward": 100, "backward": 200}
    assert phases.accelerator_reserved_bytes == {"forward": 300, "backward": 400}
