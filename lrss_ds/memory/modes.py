"""The memory mode of a training run: which memory levers are on, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from lrss_ds.errors import ConfigError

CHECKPOINTING: tuple[str, ...] = ("none", "stage", "block", "fine")


@dataclass(frozen=True)
class MemoryMode:
    """Which memory levers a training step uses.

    Args:
        checkpointing: activation checkpointing granularity: ``"none"``, ``"stage"``,
            ``"block"`` or ``"fine"`` (between the two: on HRNet, layer1 in halves); the
            model's ``checkpoint_plan`` names the segments.
        cpu_checkpointing: keep the checkpointed segment inputs in host memory (DeepSpeed's
            ``cpu_checkpointing``); needs ``checkpointing != "none"``. A no-op move on CPU.
        offload_saved_tensors: move every other tensor autograd saves for backward to host
            memory (pinned, asynchronous copies) and back when backward needs it. A no-op move
            on CPU, still counted by the ledger.
        loss_band_rows: compute the full-resolution upsampling and loss in row bands of this
            height under recomputation (passed to ``build_loss(..., band_rows=...)``);
            ``None`` = one piece.
        stem_band_rows: run every HRNet stem (conv -> BN -> ReLU -> conv) in bands of this many
            rows of its half-resolution maps, with BatchNorm's batch statistics taken in a
            first pass (:mod:`lrss_ds.memory.banded_stem`); ``None`` = the stem's own layers.
        bf16: run forward and loss under ``torch.autocast(dtype=torch.bfloat16)``; weights,
            gradients and BatchNorm running statistics stay float32.
        channels_last: run activations in ``torch.channels_last`` layout (faster convolutions
            on CPU/oneDNN and tensor cores); each segment's 4-D inputs are converted.

    Raises:
        ConfigError: on an unknown granularity, a wrong type, ``cpu_checkpointing`` without
            checkpointing or ``loss_band_rows < 1``.
    """

    checkpointing: str = "none"
    cpu_checkpointing: bool = False
    offload_saved_tensors: bool = False
    loss_band_rows: int | None = None
    stem_band_rows: int | None = None
    bf16: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "memory") -> None:
        """Check types and combinations.

        Args:
            where: the config key prefix used in error messages.

        Raises:
            ConfigError: naming the offending key.
        """
        if self.checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"{where}.checkpointing", f"unknown value {self.checkpointing!r}; use one of {list(CHECKPOINTING)}"
            )
        for key in ("cpu_checkpointing", "offload_saved_tensors", "bf16", "channels_last"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{where}.{key}", f"must be true or false, got {getattr(self, key)!r}")
        for key in ("loss_band_rows", "stem_band_rows"):
            rows = getattr(self, key)
            if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
                raise ConfigError(f"{where}.{key}", f"must be a positive integer or null, got {rows!r}")
        if self.cpu_checkpointing and self.checkpointing == "none":
            raise ConfigError(
                f"{where}.cpu_checkpointing", "needs checkpointing stage, block or fine (it moves checkpoint inputs)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The mode as a plain dict (for the resolved config and benchmark records)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "memory") -> MemoryMode:
        """Build a mode from a dict, optionally starting from a preset.

        A key ``preset`` names a preset from :data:`MEMORY_PRESETS`; the other keys override
        its fields. Example: ``{"preset": "ckpt_stage", "bf16": true}``.

        Args:
            values: field values (and optionally ``preset``).
            where: config key prefix for error messages.

        Returns:
            the validated mode.

        Raises:
            ConfigError: on an unknown key or preset, or an invalid value.
        """
        values = dict(values)
        base = get_memory_mode(values.pop("preset")) if "preset" in values else cls()
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"{where}.{key}", f"unknown key; use one of {sorted(known | {'preset'})}")
        mode = dataclasses.replace(base, **values) if values else base
        mode.validate(where)
        return mode


MEMORY_PRESETS: dict[str, MemoryMode] = {
    # plain training: everything autograd saves stays in device memory
    "none": MemoryMode(),
    "ckpt_stage": MemoryMode(checkpointing="stage"),
    "ckpt_block": MemoryMode(checkpointing="block"),
    "ckpt_fine": MemoryMode(checkpointing="fine"),
    # accelerator runs short of device memory: checkpoints and saved tensors live on the host
    "ckpt_offload": MemoryMode(checkpointing="stage", cpu_checkpointing=True, offload_saved_tensors=True),
    # whole-scene levers that matter where device memory = host memory (CPU): checkpoints with
    # layer1 in halves, the stem in bands, the loss in bands, channels-last; with and without bf16
    # autocast. Measured on EHSNet-W18 at 2048 x 2048 fp32 (stop 9): once the LRD was checkpointed
    # term by term, the step's peak sat in layer1's recomputation (four blocks at once) and then in
    # the stem's (64-channel half-resolution maps and their gradients, ~1.1 GiB); layer1 in halves
    # and the banded stem take both apart (peak 2.33 -> 1.54 GiB). Stem bands of 32 rows ran the
    # stem's forward + backward faster than the unbanded layers (1.53 vs 1.69 s, cache-sized
    # bands); 128 rows took 3.0 s.
    "fullres_fp32": MemoryMode(checkpointing="fine", loss_band_rows=128, stem_band_rows=32, channels_last=True),
    "fullres_bf16": MemoryMode(
        checkpointing="fine", loss_band_rows=128, stem_band_rows=32, channels_last=True, bf16=True
    ),
    # every lever at once
    "full": MemoryMode(
        checkpointing="fine",
        cpu_checkpointing=True,
        offload_saved_tensors=True,
        loss_band_rows=128,
        stem_band_rows=32,
        bf16=True,
        channels_last=True,
    ),
}
"""Named memory modes; ``MemoryMode.from_dict({"preset": name, ...})`` starts from one."""

PLANNED_PRESETS: dict[str, str] = {
    "none": "plain training (no checkpointing, no offload)",
    "ckpt_stage": "activation checkpointing per stage",
    "ckpt_offload": "stage checkpointing + checkpoint inputs and saved tensors offloaded to the host",
    "fullres_fp32": "fine checkpoints (layer1 in halves) + stem and loss in row bands + channels-last, fp32",
    "fullres_bf16": "fullres_fp32 levers under bf16 autocast (weights and BN statistics fp32)",
}
"""The presets the planner measures and the benchmarks' ``--modes`` offer, from the least to the
most memory machinery, each with its one-line summary for tables. The planner's setups
(``lrss_ds.engine.probe.PLAN_SETUPS``) and the benchmarks' mode lists are derived from it."""


def get_memory_mode(name: str) -> MemoryMode:
    """Look up a preset by name.

    Args:
        name: a key of :data:`MEMORY_PRESETS`.

    Returns:
        the preset (frozen, so it can be shared).

    Raises:
        ConfigError: for an unknown name.
    """
    if name not in MEMORY_PRESETS:
        raise ConfigError("memory.preset", f"unknown preset {name!r}; use one of {sorted(MEMORY_PRESETS)}")
    return MEMORY_PRESETS[name]
