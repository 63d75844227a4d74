"""Experiment configuration: plain dataclasses loaded from one flat YAML, validated, overridable.

One YAML per experiment (see ``ds_configs/*.yaml``) plus the DeepSpeed JSON it names. Every key is
a field of a dataclass below; an unknown key or a value of the wrong type is a
:class:`~lrss_ds.errors.ConfigError` naming the dotted key. Any key can be overridden from the
command line as a ``dotted.key=value`` argument (the value is read as YAML, so ``20``, ``0.5``,
``null``, ``[1000, 2000]`` and ``{k: 32}`` all work), e.g.::

    lrss-ds train --config ds_configs/ehsnet_synthetic.yaml train.iterations=20 model.options.lrd_k=32

Keys under a free-form mapping (``model.options``, ``loss.options``, ``optim.group_lrs``,
``deepspeed.override``) are not checked here: the model/loss builders and DeepSpeed check them.

Path rules: ``deepspeed.config`` is relative to the YAML file's directory (an experiment and its
JSON travel together); ``data.store``, ``model.pretrained`` and ``train.output`` are relative to the
current directory (they are the user's data and outputs).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import yaml

from lrss_ds.data.augment import AUGMENTATIONS
from lrss_ds.engine.temporaries import write_text_atomically
from lrss_ds.errors import ConfigError
from lrss_ds.memory.modes import CHECKPOINTING, MemoryMode


@dataclass
class ModelConfig:
    """Which network to build.

    Args:
        name: a key of ``lrss_ds.models.MODEL_BUILDERS`` (``ehsnet``, ``glsnet``, ``hrnet_fcn``,
            ``glnet``).
        options: keyword options of that builder (e.g. ``{width: 18, k: 64}``).
        pretrained: optional path of backbone weights given to ``load_pretrained``.
    """

    name: str = "ehsnet"
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


@dataclass
class SynthConfig:
    """Synthetic scenes to generate when ``data.store`` does not exist yet (demos and tests).

    Args:
        train_scenes: scenes in the train split.
        val_scenes: scenes in the val split.
        height: scene height in pixels.
        width: scene width in pixels.
        bands: number of image bands (the ``synthetic`` dataset has 4: NIR, R, G, B).
        seed: generator seed (the same seed gives the same scenes).
        water_scale: factor on the river width and lake radii (``lrss_ds.data.synth.make_layout``;
            1 draws the default scenes).
    """

    train_scenes: int = 4
    val_scenes: int = 2
    height: int = 512
    width: int = 512
    bands: int = 4
    seed: int = 0
    water_scale: float = 1.0


@dataclass
class DataConfig:
    """Where samples come from and how they are cut.

    Args:
        store: path of the Zarr tile store (``lrss-ds ingest`` output).
        synthetic: if set and ``store`` does not exist, synthesize and ingest it first.
        train_split: split trained on.
        val_split: split evaluated on (empty string: no evaluation).
        mode: ``whole`` (one whole scene per sample: holistic training) or ``patch``.
        patch_size: patch side in ``patch`` mode.
        patches_per_scene: patches drawn per scene and epoch in ``patch`` mode.
        workers: DataLoader worker processes reading the store (0 reads in the training process).
        prefetch: samples each worker reads ahead.
    """

    store: str = ""
    synthetic: SynthConfig | None = None
    train_split: str = "train"
    val_split: str = "val"
    mode: str = "whole"
    patch_size: int = 512
    patches_per_scene: int = 4
    workers: int = 1
    prefetch: int = 2


@dataclass
class OptimConfig:
    """The optimizer and its parameter groups (the DeepSpeed JSON must not name an optimizer).

    Args:
        type: ``sgd``, ``adam`` or ``adamw``. Adam(W) becomes DeepSpeedCPUAdam when the JSON
            offloads the optimizer; SGD stays ``torch.optim.SGD`` (run by ZeRO-Offload on the host).
        lr: base learning rate (the schedule multiplies it).
        momentum: SGD momentum.
        betas: Adam betas.
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) weight decay.
        head_lr_mult: LR multiplier for parameters whose name has a component containing one of
            ``head_keys`` (EHSNet: 10, following the paper).
        head_keys: name fragments marking segmentation-head parameters.
        group_lrs: first-name-component prefix -> LR, overriding ``lr`` for those parameters
            (GLSNet: ``{global: 1.0e-4, local: 2.0e-5}``).
    """

    type: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    head_lr_mult: float = 1.0
    head_keys: list[str] = field(default_factory=lambda: ["head"])
    group_lrs: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule as factors of each group's LR, applied per optimizer step.

    Args:
        warmup_iters: iterations at the constant warm-up LR.
        warmup_lr: the warm-up LR (absolute, for the base group; other groups keep their ratio).
        policy: ``step`` (multiply by ``gamma`` at each milestone), ``poly`` (power 0.9 down to
            ``min_lr``) or ``constant``.
        milestones: iterations (counted from 0, warm-up included) where ``step`` decays.
        gamma: ``step`` decay factor.
        min_lr: floor of the base LR (``poly``; ``step`` never goes below it either).
    """

    warmup_iters: int = 0
    warmup_lr: float = 0.0
    policy: str = "step"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr: float = 0.0


def _memory_config() -> type:
    """The ``memory`` section's dataclass, generated from :class:`~lrss_ds.memory.MemoryMode`.

    Its fields are ``preset`` (a name in ``MEMORY_PRESETS``; ``None``: the plain ``MemoryMode()``)
    and every ``MemoryMode`` field, each optional (``None``: keep the preset's value), so a new
    memory lever is a ``MemoryMode`` field and nothing here.
    """
    hints = typing.get_type_hints(MemoryMode)
    fields = [("preset", str | None, field(default=None))]
    fields += [(f.name, hints[f.name] | None, field(default=None)) for f in dataclasses.fields(MemoryMode)]
    section = dataclasses.make_dataclass("MemoryConfig", fields)
    section.__doc__ = "Memory mode: a named preset of ``lrss_ds.memory``, optionally with fields changed."
    section.__module__ = __name__  # pickles and reprs name this module, where it lives
    return section


MemoryConfig = _memory_config()


@dataclass
class DeepSpeedConfigRef:
    """The DeepSpeed JSON: the single source of truth for ZeRO, offload, dtype, accumulation.

    Args:
        config: path of the JSON, relative to the experiment YAML's directory.
        override: keys merged (recursively) into the JSON before ``deepspeed.initialize``, for
            command-line experiments (``deepspeed.override.gradient_accumulation_steps=2``).
    """

    config: str = "cpu.json"
    override: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The loss: ``lrss_ds.models.losses.build_loss(name, num_classes, ignore_index, **options)``.

    Args:
        name: ``ehsnet``, ``focal``, ``ce``, ``isdnet`` or ``stdc``.
        options: keyword options of the loss (``band_rows`` is set from the memory mode).
    """

    name: str = "ehsnet"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Loop control.

    Args:
        seed: seed of torch, numpy and python RNGs (plus the rank) and of the sample order.
        iterations: optimizer steps to train (the schedule's time axis).
        eval_every: evaluate every this many iterations (0: only at the end).
        checkpoint_every: save a checkpoint every this many iterations (0: only at the end).
        keep_last: checkpoints kept besides the best one.
        max_nonfinite: non-finite losses in a row tolerated before ``TrainingError``.
        log_every: write a log line every this many iterations.
        output: run directory (``--output`` overrides it).
        simulate_device_memory: follow every training step with
            ``lrss_ds.memory.device_sim.DeviceMemorySimulator`` and write its simulated device
            peak to ``metrics.json`` (slows the steps; for sizing a GPU from a CPU run).
        augment: ``none``, or ``d4``: each training sample flipped/turned by one of the 8
            right-angle transforms (``lrss_ds.data.augment``; never at evaluation).
        recalibrate_bn: recompute BatchNorm running statistics with the final weights over this
            many training samples before the final evaluation and checkpoint (0: off;
            ``lrss_ds.engine.batchnorm_recalibration``).
        budget_cpu_s: stop once the training process has used this many CPU seconds (None: no
            budget); ``iterations`` stays the cap and the schedule's axis (``lrss_ds.engine.budget``).
        budget_wall_s: the same in wall-clock seconds.
    """

    seed: int = 0
    iterations: int = 100
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_last: int = 2
    max_nonfinite: int = 5
    log_every: int = 1
    output: str = "runs/default"
    simulate_device_memory: bool = False
    augment: str = "none"
    recalibrate_bn: int = 0
    budget_cpu_s: float | None = None
    budget_wall_s: float | None = None


@dataclass
class ParallelConfig:
    """How the ranks share the work besides data parallelism.

    Args:
        spatial: ranks that split each scene into horizontal bands and compute the one-rank
            loss and gradients together (``lrss_ds.parallel``); the world is ``spatial x data``.
            1: each rank holds whole scenes.
    """

    spatial: int = 1


@dataclass
class ExperimentConfig:
    """One experiment: everything a run needs besides the DeepSpeed JSON it names."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    deepspeed: DeepSpeedConfigRef = field(default_factory=DeepSpeedConfigRef)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Where the YAML was read from; resolves ``deepspeed.config``. Not a YAML key.
    source: str = field(default="", metadata={"internal": True})
    # Dotted key -> the ``key=value`` command-line item that set it. Not a YAML key.
    overrides: dict[str, str] = field(default_factory=dict, metadata={"internal": True})

    def where(self, key: str) -> str:
        """Name where the value of dotted ``key`` came from, for an error message.

        Returns:
            ``"command line: train.lr=abc"`` when a command-line override set ``key`` (or a key
            inside it or around it), else ``"<experiment YAML>: key"``.
        """
        return _locate(key, self.source or "experiment config", self.overrides)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.mode": ("whole", "patch"),
    "optim.type": ("sgd", "adam", "adamw"),
    "schedule.policy": ("step", "poly", "constant"),
    "memory.checkpointing": CHECKPOINTING,
    "train.augment": AUGMENTATIONS,
}


def _type_name(hint: Any) -> str:
    """Readable name of a type hint for error messages."""
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint`` and return it converted.

    Args:
        value: the value read from YAML.
        hint: a resolved type hint (dataclass, scalar, ``list[...]``, ``dict[...]``, optional).
        key: the dotted key, for the error.

    Returns:
        The value (a dataclass instance for a dataclass hint; ints widened to float).

    Raises:
        ConfigError: the value does not fit the hint.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        real = [option for option in options if option is not type(None)]
        if len(real) == 1:  # `X | None`: report X's own error (it names the inner key)
            return _coerce(value, real[0], key)
        for option in real:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(key, f"expected {_type_name(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item, item_hint, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, value_hint = typing.get_args(hint)
        return {str(k): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    # bool is a subclass of int: refuse `iterations: true` and `bf16: 1` alike.
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-4` (no dot) as a string; accept what float() reads.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ConfigError(key, f"expected {_type_name(hint)}, got {value!r}")


def _build(cls: type, mapping: dict[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``mapping``, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(names))})")
        kwargs[name] = _coerce(value, hints[name], key)
        choices = _CHOICES.get(key)
        if choices is not None and kwargs[name] is not None and kwargs[name] not in choices:
            raise ConfigError(key, f"must be one of {', '.join(choices)}, got {kwargs[name]!r}")
    return cls(**kwargs)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[2, 3]"]`` into a nested mapping ``{"a": {"b": 1}, "c": [2, 3]}``.

    Args:
        items: ``dotted.key=value`` strings; each value is parsed as YAML.

    Returns:
        The nested mapping, ready to merge into the YAML's.

    Raises:
        ConfigError: an item has no ``=``, an empty key, or a value that is not valid YAML.
    """
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"command line: {item}", "an override must look like dotted.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"command line: {item}", f"value {text!r} is not valid YAML ({error})") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"command line: {item}", "overrides both a key and a key inside it")
            node = child
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML, apply ``dotted.key=value`` overrides and validate the result.

    Args:
        path: the experiment YAML.
        overrides: command-line overrides, applied after the file.

    Returns:
        The validated :class:`ExperimentConfig`.

    Raises:
        ConfigError: missing/unreadable file, invalid YAML, unknown key, wrong type or bad choice.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(path, f"cannot read the experiment config ({error.strerror})") from None
    try:
        mapping = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(path, f"not valid YAML: {error}") from None
    if not isinstance(mapping, dict):
        raise ConfigError(path, "the experiment config must be a mapping of sections")
    mapping = merge(mapping, parse_overrides(overrides))
    origins = override_origins(overrides)
    try:
        config = _build(ExperimentConfig, mapping, "")
    except ConfigError as error:
        raise ConfigError(_locate(error.where, str(path), origins), error.problem) from None
    config.source = str(path.resolve())
    config.overrides = origins
    _check_values(config, lambda key: _locate(key, str(path), origins))
    return config


def override_origins(items: Sequence[str]) -> dict[str, str]:
    """Map each overridden dotted key to its command-line item: ``{"optim.lr": "optim.lr=abc"}``."""
    return {item.partition("=")[0].strip().lstrip("-"): item for item in items}


def _locate(key: str, path: str, origins: dict[str, str]) -> str:
    """``"command line: ITEM"`` if an override in ``origins`` set ``key`` or a key inside/around it,
    else ``"PATH: key"`` (the YAML file the value was read from)."""
    for given, item in origins.items():
        if key == given or key.startswith((given + ".", given + "[")) or given.startswith(key + "."):
            return f"command line: {item}"
    return f"{path}: {key}"


def _check_values(config: ExperimentConfig, where: Callable[[str], str]) -> None:
    """Refuse values of the right type that cannot work (non-positive counts, sizes and rates).

    Args:
        config: the built config.
        where: dotted key -> where it was set (the YAML file or the command-line item).
    """
    positive = {
        "train.iterations": config.train.iterations,
        "train.keep_last": config.train.keep_last,
        "train.log_every": config.train.log_every,
        "data.patch_size": config.data.patch_size,
        "data.patches_per_scene": config.data.patches_per_scene,
        "data.prefetch": config.data.prefetch,
        "parallel.spatial": config.parallel.spatial,
    }
    non_negative = {
        "train.eval_every": config.train.eval_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.max_nonfinite": config.train.max_nonfinite,
        "data.workers": config.data.workers,
        "schedule.warmup_iters": config.schedule.warmup_iters,
    }
    # Rates: a negative or NaN learning rate trains without a word (the optimizer takes it).
    positive.update({
        "optim.lr": config.optim.lr,
        "optim.head_lr_mult": config.optim.head_lr_mult,
        "schedule.gamma": config.schedule.gamma,
        **{f"optim.group_lrs.{name}": lr for name, lr in config.optim.group_lrs.items()},
    })
    non_negative.update({
        "schedule.warmup_lr": config.schedule.warmup_lr,
        "schedule.min_lr": config.schedule.min_lr,
        "optim.weight_decay": config.optim.weight_decay,
        "optim.momentum": config.optim.momentum,
    })
    for key, value in positive.items():
        # `not value > 0` also catches NaN, which every comparison calls false.
        if not value > 0 or not math.isfinite(value):
            raise ConfigError(where(key), f"must be positive and finite, got {value}")
    for key, value in non_negative.items():
        if not value >= 0 or not math.isfinite(value):
            raise ConfigError(where(key), f"must be zero or positive and finite, got {value}")
    if not config.data.store:
        raise ConfigError(where("data.store"), "is required (path of the tile store)")
    if sorted(config.schedule.milestones) != config.schedule.milestones:
        raise ConfigError(where("schedule.milestones"), "must be increasing")
    _check_train_features(config, where)
    _check_spatial(config, where)


def _check_spatial(config: ExperimentConfig, where: Callable[[str], str]) -> None:
    """Refuse ``parallel.spatial > 1`` with a model, data mode or memory lever that cannot split a scene."""
    if config.parallel.spatial == 1:
        return
    from lrss_ds.parallel.convert import SUPPORTED

    key = where("parallel.spatial")
    if config.model.name not in SUPPORTED:
        raise ConfigError(key, f"model {config.model.name!r} has no spatial version (supported: {list(SUPPORTED)}); set 1")
    if config.model.options.get("mode", "holistic") != "holistic":
        raise ConfigError(key, f"needs model mode holistic, got {config.model.options['mode']!r}; set 1")
    if config.data.mode != "whole":
        raise ConfigError(key, f"splits whole scenes; data.mode is {config.data.mode!r}; set 1")
    if config.memory.stem_band_rows is not None:
        raise ConfigError(key, "the banded stem (memory.stem_band_rows) does not split over ranks; set one of them off")
    if config.train.augment != "none":
        raise ConfigError(key, f"a flip or turn moves pixels between bands; train.augment is {config.train.augment!r}, set none")
    if config.train.recalibrate_bn:
        raise ConfigError(key, "train.recalibrate_bn forwards whole scenes on each rank, which a band of a scene cannot; set it 0")


def _check_train_features(config: ExperimentConfig, where: Callable[[str], str]) -> None:
    """Refuse a negative ``train.recalibrate_bn`` and a budget that is not a positive number."""
    count = config.train.recalibrate_bn
    if count < 0:
        raise ConfigError(where("train.recalibrate_bn"), f"must be zero (off) or positive, got {count}")
    for key in ("budget_cpu_s", "budget_wall_s"):
        value = getattr(config.train, key)
        if value is not None and not (0 < value < float("inf")):
            raise ConfigError(where(f"train.{key}"), f"must be a positive number of seconds or null, got {value}")


def deepspeed_json_path(config: ExperimentConfig) -> Path:
    """Return the DeepSpeed JSON path, resolved against the experiment YAML's directory."""
    path = Path(config.deepspeed.config)
    if not path.is_absolute() and config.source:
        path = Path(config.source).parent / path
    return path


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Return the config as plain mappings (no internal fields), as written to ``config.yaml``."""
    data = dataclasses.asdict(config)
    for item in dataclasses.fields(config):
        if item.metadata.get("internal"):
            data.pop(item.name, None)
    return data


def save_config(config: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back to an equal config.

    Written under a temporary name and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    header = f"# resolved experiment config (from {config.source or 'defaults'})\n"
    # deepspeed.config is made absolute so the saved file can be loaded from its own directory.
    data = to_dict(config)
    data["deepspeed"]["config"] = str(deepspeed_json_path(config).resolve())
    write_text_atomically(path, header + yaml.safe_dump(data, sort_keys=False))
