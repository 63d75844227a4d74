"""The planner's measured workload: training steps of a model under a memory mode, with their peaks.

``probe_training_step`` builds the model and its engine with the trainer's set-up
(:func:`lrss_ds.engine.setup.build_step_parts`), runs the trainer's own step
(:func:`lrss_ds.engine.trainer.train_step`) on one random whole sample and reports peak memory and
step times. It is meant to run in a fresh process (:func:`lrss_ds.engine.isolated.run_isolated`),
whose exact peak RSS the parent reads from the kernel. :func:`measure_steps` is the measurement
around the step, for workloads that draw their micro-batches otherwise (the benchmarks' patch
baselines).

What "device memory" means: on an accelerator, the allocator's peak
(``torch.cuda.max_memory_allocated``). On a CPU there is no device, so the probe reports the
simulated device peak of :mod:`lrss_ds.memory.device_sim` (the live storages a GPU run would keep
on the card, measured in the first step) and the parent the process's peak RSS.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from lrss_ds.engine.isolated import REPO_ROOT
from lrss_ds.errors import ConfigError
from lrss_ds.memory.modes import PLANNED_PRESETS



@dataclass(frozen=True)
class PlanSetup:
    """A memory preset paired with the DeepSpeed JSON the planner and the benchmarks run it with.

    Attributes:
        name: the planner's name for it (a column in every table).
        memory_preset: the ``lrss_ds.memory`` preset entered around forward + backward.
        ds_config: the DeepSpeed JSON (relative to the repository root) the step trains with.
        summary: one line for tables.
        ds_override: keys merged into that JSON (``deepspeed.override`` of an experiment).
    """

    name: str
    memory_preset: str
    ds_config: str
    summary: str
    ds_override: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.name)


# The project's CPU default DeepSpeed JSON: ZeRO-2 with the optimizer on the host.
CPU_DS_CONFIG = "ds_configs/cpu.json"

# DeepSpeed's own offload on top of a preset. Their JSONs say cpu_checkpointing false; the
# memory mode and the JSON must agree, hence the override.
ZERO_OFFLOAD_SETUPS: tuple[PlanSetup, ...] = (
    PlanSetup("zero2_offload", "ckpt_offload", "ds_configs/zero2_offload.json",
              "ckpt_offload + ZeRO-2, optimizer offloaded (DeepSpeedCPUAdam), pinned, overlapped",
              {"activation_checkpointing": {"cpu_checkpointing": True}}),
    PlanSetup("zero3_offload", "ckpt_offload", "ds_configs/zero3_offload.json",
              "ckpt_offload + ZeRO-3, parameters and optimizer offloaded",
              {"activation_checkpointing": {"cpu_checkpointing": True}}),
)


def _plan_setups() -> dict[str, PlanSetup]:
    """One setup per planned memory preset on the CPU JSON, each followed by its ZeRO-offload setups."""
    setups: dict[str, PlanSetup] = {}
    for preset, summary in PLANNED_PRESETS.items():
        setups[preset] = PlanSetup(preset, preset, CPU_DS_CONFIG, summary)
        setups.update((zero.name, zero) for zero in ZERO_OFFLOAD_SETUPS if zero.memory_preset == preset)
    return setups


# Ordered from the least to the most memory machinery (``PLANNED_PRESETS``' order). "Cheapest" in
# a recommendation is decided by the predicted step time (measured), not by this order.
PLAN_SETUPS: dict[str, PlanSetup] = _plan_setups()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def probe_step_parts(
    model: str,
    mode: str,
    bands: int,
    num_classes: int,
    model_options: dict[str, Any] | None = None,
    loss: str | None = None,
    seed: int = 0,
) -> Any:
    """Build ``model`` and its engine as the trainer does, under the memory mode ``mode``.

    Initialises a one-rank job when no launcher started one. The experiment is the default one
    with the mode's preset and DeepSpeed JSON; the DeepSpeed monitors are off (a probe writes no
    files).

    Args:
        model: a ``MODEL_BUILDERS`` name.
        mode: a ``PLAN_SETUPS`` name.
        bands: input bands C.
        num_classes: classes K.
        model_options: extra ``build_model`` options (e.g. ``{"mode": "holistic"}``).
        loss: a ``build_loss`` name; default: the model's ``lrss_ds.models.DEFAULT_LOSS``.
        seed: torch seed, set before the model is built.

    Returns:
        The :class:`~lrss_ds.engine.setup.StepParts` (ignore index 255).

    Raises:
        ConfigError: for an unknown mode.
    """
    import torch

    from lrss_ds.engine.config import (
        DeepSpeedConfigRef,
        ExperimentConfig,
        LossConfig,
        MemoryConfig,
        ModelConfig,
        TrainConfig,
    )
    from lrss_ds.engine.setup import build_step_parts, init_distributed, load_deepspeed_json
    from lrss_ds.models import build_model, default_loss

    if mode not in PLAN_SETUPS:
        raise ConfigError("mode", f"unknown memory mode {mode!r}; use one of {list(PLAN_SETUPS)}")
    plan_mode = PLAN_SETUPS[mode]
    torch.manual_seed(seed)
    init_distributed()
    config = ExperimentConfig(
        model=ModelConfig(name=model, options=dict(model_options or {})),
        memory=MemoryConfig(preset=plan_mode.memory_preset),
        loss=LossConfig(name=loss or default_loss(model)),
        deepspeed=DeepSpeedConfigRef(config=str(REPO_ROOT / plan_mode.ds_config),
                                     override={**plan_mode.ds_override, "csv_monitor": {"enabled": False},
                                               "tensorboard": {"enabled": False}}),
        train=TrainConfig(output=tempfile.gettempdir()),
    )
    net = build_model(model, num_classes, bands, **(model_options or {}))
    return build_step_parts(net, config, load_deepspeed_json(config), num_classes, 255)


def measure_steps(parts: Any, step_batches: Sequence[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Run the trainer's step over ``step_batches``, ``steps`` times, and report peaks and times.

    One timed step is one pass over ``step_batches`` (one optimizer step per micro-batch). The
    first pass runs under :class:`~lrss_ds.memory.device_sim.DeviceMemorySimulator`; the step
    times reported leave it out (it slows the step).

    Args:
        parts: from :func:`probe_step_parts` (or ``build_step_parts``).
        step_batches: micro-batches ``{"image": (B, C, H, W), "label": (B, H, W)}`` of one timed step.
        steps: timed steps; the fastest after the first is reported (the first pays for kernel
            selection and first-touch page faults).

    Returns:
        JSON-able dict: ``saved_activation_peak_bytes`` (ledger, on device),
        ``phase_device_peak_bytes`` (accelerator allocator per phase, None on CPU),
        ``phase_simulated_device_peak_bytes`` and ``phase_rss_peak_bytes`` (``{phase: bytes}``
        for the phases of :data:`~lrss_ds.engine.step_phases.PHASES`; RSS per phase only where
        the high-water mark can be reset, i.e. Linux), ``process_peak_rss_bytes``,
        ``offloaded_peak_bytes`` and ``saved_total_peak_bytes`` (ledger), ``device_peak_bytes``
        (accelerator allocator, None on CPU), ``simulated_device_peak_bytes`` /
        ``simulated_host_peak_bytes``, ``model_state_bytes`` (parameters + gradients + optimizer
        state), ``parameters``, ``step_s`` and ``step_cpu_s`` (lists), ``step_min_s``,
        ``step_cpu_min_s``, ``loss`` (last; NaN when not finite), ``rss_after_setup_bytes``,
        ``optimizer_steps_per_image``, ``torch_threads``.
    """
    import torch

    from lrss_ds.engine.isolated import PROCESS_PEAK_KEY
    from lrss_ds.engine.resident_memory import lifetime_peak_bytes
    from lrss_ds.engine.step_phases import PhasePeaks, step_phases
    from lrss_ds.engine.trainer import train_step
    from lrss_ds.memory.device_sim import DeviceMemorySimulator, simulating

    engine, ledger = parts.engine, parts.ledger
    device = engine.device
    rss_after_setup = lifetime_peak_bytes()
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    cpu_times: list[float] = []
    last_loss: float | None = math.nan
    saved_device_peak = saved_offloaded_peak = saved_total_peak = 0
    engine.train()
    simulator = DeviceMemorySimulator(engine)
    # Peaks per phase of the step: the step's peak is the largest of them, and each grows with
    # the pixels at its own rate, so the planner fits each phase (see plan.PhasedFit).
    phases = PhasePeaks(device)

    for index in range(steps):
        phases.begin_step(simulator if index == 0 else None)
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        for batch in step_batches:
            with simulating(phases.simulator), step_phases(engine, phases):
                last_loss = train_step(parts, batch)
            # apply_memory_mode restarts the ledger's peaks every step: keep the maximum.
            saved_device_peak = max(saved_device_peak, ledger.peak_device_bytes)
            saved_offloaded_peak = max(saved_offloaded_peak, ledger.peak_offloaded_bytes)
            saved_total_peak = max(saved_total_peak, ledger.peak_total_bytes)
        if on_cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(_cpu_seconds() - start_cpu)
    return {
        "saved_activation_peak_bytes": int(saved_device_peak),
        "offloaded_peak_bytes": int(saved_offloaded_peak),
        "saved_total_peak_bytes": int(saved_total_peak),
        "device_peak_bytes": max([torch.cuda.max_memory_allocated(device), *phases.accelerator_bytes.values()])
        if on_cuda else None,
        "phase_device_peak_bytes": phases.accelerator_bytes if on_cuda else None,
        "simulated_device_peak_bytes": max([simulator.peak_device_bytes, *phases.simulated_device_bytes.values()]),
        "simulated_host_peak_bytes": max([simulator.peak_host_bytes, *phases.simulated_host_bytes.values()]),
        "phase_simulated_device_peak_bytes": phases.simulated_device_bytes,
        "phase_rss_peak_bytes": phases.rss_bytes,
        PROCESS_PEAK_KEY: phases.process_peak(),
        "model_state_bytes": _model_state_bytes(engine),
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "step_s": times,
        "step_min_s": min(times[1:] or times),
        # CPU seconds of all this process's threads: on a machine shared with other jobs this
        # is the work a step costs, which wall-clock time is not.
        "step_cpu_s": cpu_times,
        "step_cpu_min_s": min(cpu_times[1:] or cpu_times),
        "loss": math.nan if last_loss is None else last_loss,
        "rss_after_setup_bytes": rss_after_setup,
        "optimizer_steps_per_image": len(step_batches),
        "torch_threads": torch.get_num_threads(),
    }


def probe_training_step(
    model: str = "ehsnet",
    height: int = 512,
    width: int = 512,
    mode: str = "none",
    steps: int = 2,
    bands: int = 4,
    num_classes: int = 6,
    model_options: dict[str, Any] | None = None,
    loss: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``steps`` whole-sample training steps of ``model`` under ``mode`` and report the peaks.

    Meant to run in a fresh process (``run_isolated("lrss_ds.engine.probe:probe_training_step",
    ...)``). The sample is a random uint8 image ``(1, bands, height, width)`` and random labels
    ``(1, height, width)``: memory and time do not depend on the content.

    Args:
        model: a ``MODEL_BUILDERS`` name.
        height: sample height H.
        width: sample width W.
        mode: a ``PLAN_SETUPS`` name.
        steps: training steps (see :func:`measure_steps`).
        bands: input bands C.
        num_classes: classes K.
        model_options: extra ``build_model`` options.
        loss: a ``build_loss`` name (see :func:`probe_step_parts`).
        seed: torch seed.

    Returns:
        :func:`measure_steps`' dict plus ``model``, ``mode``, ``height``, ``width``, ``pixels``.

    Raises:
        ConfigError: for an unknown mode.
    """
    parts = probe_step_parts(model, mode, bands, num_classes, model_options, loss, seed)
    sample = random_sample(bands, height, width, num_classes, parts.engine.device)
    measured = measure_steps(parts, [sample], steps)
    return {"model": model, "mode": mode, "height": height, "width": width, "pixels": height * width, **measured}


def random_sample(bands: int, height: int, width: int, num_classes: int, device: Any) -> dict[str, Any]:
    """A random micro-batch of one sample: ``image (1, bands, H, W)`` uint8, ``label (1, H, W)`` uint8, on ``device``."""
    import torch

    image = torch.randint(0, 256, (1, bands, height, width), dtype=torch.uint8, device=device)
    label = torch.randint(0, num_classes, (1, height, width), dtype=torch.uint8, device=device)
    return {"image": image, "label": label}


def _model_state_bytes(engine: Any) -> int:
    """Bytes of parameters, gradients and optimizer state the engine keeps (any device)."""
    import torch

    total = 0
    seen: set[int] = set()

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen and tensor.numel():
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    for param in engine.module.parameters():
        add(param.data)
        add(param.grad)
    optimizer = getattr(engine, "optimizer", None)
    state = getattr(optimizer, "state", None)
    if isinstance(state, dict):
        for per_param in state.values():
            if isinstance(per_param, dict):
                for value in per_param.values():
                    add(value)
    return total

