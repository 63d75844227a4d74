"""Engine setup: distributed init, the DeepSpeed JSON, parameter groups, optimizer, LR schedule.

The DeepSpeed JSON decides ZeRO stage, offload, dtype, gradient accumulation and clipping; this
module only reads it, refuses what cannot work on this accelerator, and hands it to
``deepspeed.initialize``. The optimizer and the LR schedule come from the experiment YAML (the
paper's per-group learning rates and warm-up/step schedule cannot be said in the JSON), and are
passed to DeepSpeed as a client optimizer and a client ``LambdaLR``, which DeepSpeed steps at
each gradient-accumulation boundary and saves in its checkpoints. :func:`build_step_parts`
assembles what a training step runs with (engine, loss, memory mode, ledger) for the trainer, the
planner's probe and the benchmarks alike.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lrss_ds.engine.config import ExperimentConfig, OptimConfig, ScheduleConfig, deepspeed_json_path, merge
from lrss_ds.engine.rendezvous import free_port
from lrss_ds.errors import ConfigError
from lrss_ds.memory.activation_checkpointing import configure_deepspeed_checkpointing

# JSON sections the YAML owns: saying them twice would leave two sources of truth.
_YAML_OWNED = ("optimizer", "scheduler")


@dataclass
class DistInfo:
    """Where this process sits in the job.

    Args:
        rank: global rank.
        world_size: number of ranks.
        local_rank: rank on this node.
    """

    rank: int
    world_size: int
    local_rank: int


def init_distributed() -> DistInfo:
    """Join the job the launcher started, or make this process a one-rank job.

    Under ``deepspeed``/``torchrun``/SLURM the launcher sets ``RANK``, ``WORLD_SIZE`` and
    ``MASTER_ADDR``; without them this sets a single rank on a free loopback port so the same
    code runs in ``lrss-ds train``. The backend is the accelerator's (gloo on CPU, NCCL on CUDA).
    Ranks sharing a host split its cores (``torch.set_num_threads``) unless ``OMP_NUM_THREADS``
    is set.

    Returns:
        This process's :class:`DistInfo`.
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        )
    if not dist.is_initialized():
        bind_local_device()
        deepspeed.init_distributed(verbose=False)
        release_shared_memory_name()
    local_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if local_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing a host would each start one thread per core; oversubscribed OpenMP
        # threads spin against each other (a 64x64 HRNet step went from 0.3 s to 5-10 s here).
        # The launcher's --bind_cores_to_rank does this split but needs numactl.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def bind_local_device() -> None:
    """Make this rank's accelerator device (``LOCAL_RANK``) current; nothing on the CPU.

    NCCL runs a collective on the current device: unbound, every rank of a node sits on device 0
    until ``deepspeed.initialize`` moves it, and jobs that never build an engine (batch
    prediction, the doctor's collective) never move. Asked of the accelerator now, so a
    ``DS_ACCELERATOR`` inherited from elsewhere cannot decide it.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" and "LOCAL_RANK" in os.environ:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))


def accelerator_summary() -> dict[str, Any]:
    """Which accelerator, device and communication backend this process uses, asked now.

    The backend is the open process group's (``torch.distributed.get_backend()``); before one is
    open, the one DeepSpeed will open (the accelerator's ``communication_backend_name()``).

    Returns:
        ``name`` (``cuda``, ``cpu``...), ``device`` (``cuda:0``, ``cpu``), ``backend``
        (``nccl``, ``gloo``...), ``backend_source`` (``process group`` or ``accelerator``),
        ``device_model`` (the GPU's name; ``None`` on CPU), ``DS_ACCELERATOR`` (as set, or
        ``"unset"``: DeepSpeed then chose by itself).
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    name = accelerator.device_name()
    opened = dist.is_available() and dist.is_initialized()
    return {
        "name": name,
        "device": accelerator.current_device_name(),
        "backend": dist.get_backend() if opened else accelerator.communication_backend_name(),
        "backend_source": "process group" if opened else "accelerator",
        "device_model": torch.cuda.get_device_name(torch.cuda.current_device()) if name == "cuda" else None,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "unset"),
    }


def describe_accelerator() -> str:
    """One log line naming the accelerator, device and backend in use (see :func:`accelerator_summary`)."""
    summary = accelerator_summary()
    device = summary["device"] + (f" ({summary['device_model']})" if summary["device_model"] else "")
    return (
        f"accelerator {summary['name']} on {device}, backend {summary['backend']} "
        f"(DS_ACCELERATOR={summary['DS_ACCELERATOR']})"
    )


def release_shared_memory_name() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name from ``/dev/shm`` once all ranks hold it.

    DeepSpeed's CPU accelerator (0.19.8, ``ops/csrc/cpu/comm/shm.cpp``) creates a 66 MB POSIX
    shared-memory buffer per rank, named ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    whenever all ranks are local, and never unlinks it: every run, even a one-rank one, left
    66 MB per rank of RAM behind in ``/dev/shm`` until reboot (9 GiB after an afternoon of tests
    here). Each rank maps its peers' buffers inside ``init_distributed``; after a barrier all
    mappings exist, so the names can go at once and the memory is freed when the processes end,
    even after a kill -9. A no-op off Linux or when the buffer was not created.
    """
    import torch.distributed as dist

    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid() if hasattr(os, "getuid") else 0,
        os.environ.get("MASTER_ADDR", ""),
        os.environ.get("MASTER_PORT", ""),
        dist.get_rank(),
    )
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has mapped every peer's buffer by now
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs (every rank passes ``config seed + rank``)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_deepspeed_json(config: ExperimentConfig) -> dict[str, Any]:
    """Read the experiment's DeepSpeed JSON, merge ``deepspeed.override`` and check it.

    Args:
        config: the experiment (its ``deepspeed`` section names the JSON).

    Returns:
        The DeepSpeed config dict given to ``deepspeed.initialize``. ``csv_monitor`` and
        ``tensorboard`` without an ``output_path`` are pointed at ``OUT/monitor``.

    Raises:
        ConfigError: missing or invalid JSON, an ``optimizer``/``scheduler`` section (the YAML
            owns those), fp16 on the CPU accelerator, or bf16 on CPU without
            ``data_types.buffer_dtype`` bf16 (BatchNorm buffers must match bf16 weights there).
    """
    from deepspeed.accelerator import get_accelerator

    path = deepspeed_json_path(config)
    try:
        ds_config = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(path, f"cannot read the DeepSpeed config ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(path, f"not valid JSON: {error}") from None
    from_file = ds_config
    ds_config = merge(ds_config, config.deepspeed.override)
    for key in _YAML_OWNED:
        if key in ds_config:
            raise ConfigError(f"{path}: {key}", f"set the {key} in the experiment YAML (optim/schedule), not the JSON")
    _batch_defaults(ds_config)
    check_deepspeed_accepts(ds_config, from_file, config, path)
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16.enabled", "fp16 is refused by DeepSpeed's CPU accelerator; use bf16 or fp32")
    if on_cpu and ds_config.get("bf16", {}).get("enabled"):
        if ds_config.get("data_types", {}).get("buffer_dtype") != "bf16":
            raise ConfigError(
                f"{path}: data_types.buffer_dtype",
                "bf16 on CPU needs buffer_dtype bf16 (BatchNorm buffers must match the bf16 weights)",
            )
    out = Path(config.train.output)
    for monitor in ("csv_monitor", "tensorboard"):
        section = ds_config.get(monitor)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            section["output_path"] = str(out / "monitor")
            section.setdefault("job_name", "train")
    return ds_config


def _batch_defaults(ds_config: dict[str, Any]) -> None:
    """Default micro-batch and accumulation to 1; drop ``train_batch_size``, which DeepSpeed derives."""
    ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
    ds_config.setdefault("gradient_accumulation_steps", 1)
    # DeepSpeed derives train_batch_size from the other two; a stale copy would contradict a
    # changed world size or accumulation, so it is not written in our JSONs.
    ds_config.pop("train_batch_size", None)


def _deepspeed_refusal(ds_config: dict[str, Any]) -> str | None:
    """DeepSpeed's own reason for refusing ``ds_config`` as one line, or None when it parses it."""
    import copy

    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(ds_config))
    except Exception as error:  # noqa: BLE001 - pydantic, assertion and type errors alike
        errors = getattr(error, "errors", None)
        if callable(errors):  # pydantic: say the field and the rule, not the documentation link
            first = errors()[0]
            return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}"
        text = str(error).strip()
        return text.splitlines()[0] if text else type(error).__name__
    return None


def _leaves(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``."""
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def check_deepspeed_accepts(
    ds_config: dict[str, Any], from_file: dict[str, Any], config: ExperimentConfig, path: Path
) -> None:
    """Let DeepSpeed parse the final config before any work, naming the key it refuses.

    Args:
        ds_config: the JSON merged with ``deepspeed.override``.
        from_file: the JSON alone.
        config: the experiment (where each override came from).
        path: the JSON's path.

    Raises:
        ConfigError: ``<where the override was given>: deepspeed.override.<key>: DeepSpeed refuses
            it: <DeepSpeed's reason>`` (or the JSON's path when the file alone is refused).
    """
    reason = _deepspeed_refusal(ds_config)
    if reason is None:
        return
    for key, value in _leaves(config.deepspeed.override):
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        alone = merge(from_file, nested)
        _batch_defaults(alone)
        if _deepspeed_refusal(alone) is not None:
            raise ConfigError(config.where(f"deepspeed.override.{key}"), f"DeepSpeed refuses it: {reason}")
    where = config.where("deepspeed.override") if config.deepspeed.override else path
    raise ConfigError(where, f"DeepSpeed refuses the config: {reason}")


def optimizer_offloaded(ds_config: dict[str, Any]) -> bool:
    """True when the JSON offloads the optimizer state and step to the host (ZeRO-Offload)."""
    zero = ds_config.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Split trainable parameters into groups with their learning rates.

    A parameter's LR is ``optim.group_lrs[prefix]`` if its name starts with ``prefix`` (longest
    prefix wins; GLSNet's global/local branches), else ``optim.lr``; it is multiplied by
    ``optim.head_lr_mult`` when a component of its dotted name contains one of
    ``optim.head_keys`` (EHSNet's heads at 10x, following the paper).

    Args:
        model: the network.
        optim: the optimizer section.

    Returns:
        Non-empty groups ``{"params", "lr", "name"}``, in a fixed order (so optimizer state
        lines up on resume).
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    prefixes = sorted(optim.group_lrs, key=len, reverse=True)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), "")
        is_head = any(key in part for part in name.split(".") for key in optim.head_keys)
        groups.setdefault((prefix, is_head), []).append(param)
    out = []
    for (prefix, is_head), params in groups.items():
        lr = optim.group_lrs[prefix] if prefix else optim.lr
        if is_head:
            lr *= optim.head_lr_mult
        label = (prefix or "base") + (".head" if is_head else "")
        out.append({"params": params, "lr": lr, "name": label})
    if not out:
        raise ConfigError("model", "has no trainable parameters")
    return out


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig, offloaded: bool) -> torch.optim.Optimizer:
    """Make the client optimizer handed to ``deepspeed.initialize``.

    Adam/AdamW under ZeRO-Offload become ``DeepSpeedCPUAdam`` (the fast host Adam; it is
    JIT-compiled with ninja + g++ on first use, about a minute). SGD has no DeepSpeed host
    kernel: ZeRO-Offload runs ``torch.optim.SGD`` on the fp32 host copy, which the JSON allows
    with ``"zero_force_ds_cpu_optimizer": false``.

    Args:
        groups: from :func:`param_groups`.
        optim: the optimizer section.
        offloaded: the JSON offloads the optimizer to the host.

    Returns:
        The optimizer.
    """
    if optim.type == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    betas = (float(optim.betas[0]), float(optim.betas[1]))
    if offloaded:
        # The JIT build looks for `ninja` on PATH; the pip-installed one sits beside this
        # interpreter, which is not on PATH when the venv is used without being activated. Only
        # then is it added: switching ninja versions makes the cached build start over.
        if shutil.which("ninja") is None:
            os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay, adamw_mode=optim.type == "adamw"
        )
    cls = torch.optim.AdamW if optim.type == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim.lr, betas=betas, weight_decay=optim.weight_decay)


def lr_factor(schedule: ScheduleConfig, base_lr: float) -> Callable[[int], float]:
    """The schedule as a factor of each group's LR, for ``torch.optim.lr_scheduler.LambdaLR``.

    Iteration ``i`` (optimizer steps done, from 0): during warm-up (``i < warmup_iters``) the
    factor is ``warmup_lr / base_lr`` (so every group keeps its ratio to the base group); then
    ``step`` multiplies by ``gamma`` at each milestone passed, ``poly`` decays
    ``(1 - i/total)**0.9``, ``constant`` stays 1. No factor goes below ``min_lr / base_lr``.

    Args:
        schedule: the schedule section.
        base_lr: ``optim.lr``.

    Returns:
        ``factor(i) -> float``.
    """
    floor = schedule.min_lr / base_lr if base_lr > 0 else 0.0
    warm = schedule.warmup_lr / base_lr if base_lr > 0 else 0.0
    milestones = list(schedule.milestones)
    total = max(milestones[-1] if milestones else 1, 1)

    def factor(i: int) -> float:
        if i < schedule.warmup_iters:
            return warm
        if schedule.policy == "step":
            value = schedule.gamma ** sum(1 for m in milestones if i >= m)
        elif schedule.policy == "poly":
            value = max(1.0 - i / total, 0.0) ** 0.9
        else:
            value = 1.0
        return max(value, floor)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, config: ExperimentConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule as a ``LambdaLR`` over optimizer steps (``poly`` ends at ``train.iterations``).

    Args:
        optimizer: the client optimizer.
        config: the experiment.

    Returns:
        The scheduler; DeepSpeed calls its ``step()`` after each optimizer step.
    """
    schedule = config.schedule
    if schedule.policy == "poly" and not schedule.milestones:
        # poly decays over the whole run; its end is the run's length.
        schedule = ScheduleConfig(**{**schedule.__dict__, "milestones": [config.train.iterations]})
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, config.optim.lr))


def resolve_memory_mode(config: ExperimentConfig) -> Any:
    """The ``lrss_ds.memory.MemoryMode`` of the ``memory`` section (preset plus the fields set)."""
    from lrss_ds.memory import MemoryMode

    section = {k: v for k, v in config.memory.__dict__.items() if v is not None}
    return MemoryMode.from_dict(section, where="memory")


def precision_autocast(engine: Any) -> Any:
    """Autocast to the engine's reduced precision when the JSON keeps weights in bf16/fp16.

    DeepSpeed's bf16/fp16 modes cast the weights, not the inputs; the model's normaliser hands
    float32 to the first convolution, which a bf16/fp16 weight refuses outside autocast. (This is
    not ``memory.bf16``, which is autocast over float32 weights and excludes JSON bf16.)

    Returns:
        ``torch.autocast`` to bf16/fp16, or a no-op context in fp32.
    """
    import contextlib

    if engine.bfloat16_enabled():
        return torch.autocast(engine.device.type, dtype=torch.bfloat16)
    if engine.fp16_enabled():
        return torch.autocast(engine.device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def initialize_engine(model: nn.Module, config: ExperimentConfig, ds_config: dict[str, Any]) -> Any:
    """Prepare ``model`` for the memory mode and wrap it in a DeepSpeed engine.

    The memory mode (channels-last, checkpoint segment runner) is applied before
    ``deepspeed.initialize`` because ZeRO keeps references to the parameter tensors.
    ``deepspeed.initialize`` does not apply the JSON's ``activation_checkpointing`` section by
    itself, so it is applied afterwards (``lrss_ds.memory``'s ``configure_deepspeed_checkpointing``
    calls ``deepspeed.checkpointing.configure``; distributed is initialised by then).

    Args:
        model: the network (on the host; DeepSpeed moves it to the accelerator).
        config: the experiment (optimizer, schedule and memory sections).
        ds_config: from :func:`load_deepspeed_json`.

    Returns:
        The ``DeepSpeedEngine``; the memory mode is ``resolve_memory_mode(config)``.
    """
    import deepspeed

    from lrss_ds.memory import prepare_model

    mode = resolve_memory_mode(config)
    prepare_model(model, mode, ds_config)
    offloaded = optimizer_offloaded(ds_config)
    if config.optim.type == "sgd" and ds_config.get("zero_optimization", {}).get("stage", 0) > 0:
        # ZeRO runs torch.optim.SGD on its flat fp32 partitions like any client optimizer; DeepSpeed
        # only vets its own and Adam-family optimizers, so SGD must be allowed explicitly, and
        # under offload it must be told not to insist on DeepSpeedCPUAdam.
        ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
        if offloaded:
            ds_config["zero_force_ds_cpu_optimizer"] = False
    optimizer = build_optimizer(param_groups(model, config.optim), config.optim, offloaded)
    scheduler = build_scheduler(optimizer, config)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if "activation_checkpointing" in ds_config and not mode.cpu_checkpointing:
        configure_deepspeed_checkpointing(False, ds_config)
    return engine


@dataclass
class StepParts:
    """What one training step (:func:`lrss_ds.engine.trainer.train_step`) runs with.

    The trainer's ``Run`` extends it; the planner's probe and the benchmarks build one with
    :func:`build_step_parts`, so the step they measure is the step that trains.

    Attributes:
        engine: the DeepSpeed engine (``engine.module`` is the model).
        loss_fn: ``loss_fn(outputs, target) -> scalar``.
        memory_mode: the ``lrss_ds.memory.MemoryMode`` entered around forward and backward.
        ledger: the ``SavedTensorLedger`` of saved activations.
    """

    engine: Any
    loss_fn: Any
    memory_mode: Any
    ledger: Any


def build_step_parts(
    model: nn.Module, config: ExperimentConfig, ds_config: dict[str, Any], num_classes: int, ignore_index: int
) -> StepParts:
    """Build the loss (``loss`` section, banded as the memory mode says) and the engine for ``model``.

    Args:
        model: the network (on the host).
        config: the experiment (``loss``, ``memory``, ``optim``, ``schedule`` sections).
        ds_config: from :func:`load_deepspeed_json`.
        num_classes: classes K.
        ignore_index: label value the loss ignores.

    Returns:
        The :class:`StepParts`, with a fresh ledger.

    Raises:
        ConfigError: from the memory section or the loss builder.
    """
    from lrss_ds.memory import SavedTensorLedger
    from lrss_ds.models.losses import build_loss

    memory_mode = resolve_memory_mode(config)
    loss_options = dict(config.loss.options)
    if memory_mode.loss_band_rows is not None:
        loss_options["band_rows"] = memory_mode.loss_band_rows
    loss_fn = build_loss(config.loss.name, num_classes, ignore_index, **loss_options)
    engine = initialize_engine(model, config, ds_config)
    return StepParts(engine=engine, loss_fn=loss_fn, memory_mode=memory_mode, ledger=SavedTensorLedger())
