"""Load a trained model from a run directory, a DeepSpeed checkpoint or an exported weights file."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lrss_ds.errors import InputFileError, LrssError
from lrss_ds.models.pretrained import torch_load_problem

WEIGHTS_FORMAT = "lrss_ds.weights.v1"
"""The ``format`` value of an exported weights file (see :mod:`lrss_ds.engine.export`)."""

META_FILE = "lrss_meta.json"
"""Written by the trainer into every checkpoint tag directory (model config, dataset, band stats)."""

ModelBuilder = Callable[..., nn.Module]
"""``builder(name=..., num_classes=..., in_channels=..., **options) -> model`` (``build_model``)."""


def resolve_checkpoint(path: str | Path) -> Path:
    """Find the checkpoint a user's path means.

    Args:
        path: a run directory (holding ``checkpoints/latest``), a checkpoints directory (holding
            ``latest``), a ``latest`` or ``best`` file naming a tag, a DeepSpeed tag directory
            (holding ``lrss_meta.json``), or an exported weights file.

    Returns:
        the tag directory or the weights file.

    Raises:
        InputFileError: the path does not exist, or is a directory with none of the above.
    """
    path = Path(path)
    if path.is_file() and path.name in ("latest", "best") and path.stat().st_size < 1024:
        # DeepSpeed's ``latest`` (and the trainer's ``best``) file names a tag directory beside it.
        tag_dir = path.parent / path.read_text().strip()
        if not (tag_dir / META_FILE).is_file():
            raise InputFileError(path, f"names checkpoint tag {tag_dir.name!r}, but {tag_dir / META_FILE} does not exist")
        return tag_dir
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputFileError(
            path, "checkpoint not found (give a run directory, a checkpoint tag directory or an exported .pt file)"
        )
    if (path / META_FILE).is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        latest = checkpoints / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            tag_dir = checkpoints / tag
            if not tag_dir.is_dir():
                raise InputFileError(latest, f"names checkpoint tag {tag!r}, but {tag_dir} does not exist")
            return tag_dir
    raise InputFileError(path, f"not a checkpoint: no {META_FILE}, no 'latest' file and no checkpoints/latest inside")


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint's consolidated fp32 state dict and its metadata, without building a model.

    DeepSpeed checkpoints (ZeRO stages 1-3, possibly sharded over ranks) are consolidated with
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``, which needs no distributed setup;
    a stage-0 checkpoint (no ZeRO optimizer shards) is read from its model-states file. DeepSpeed
    checkpoint files are pickles, so they are loaded with ``weights_only=False``: load only
    checkpoints you trust. Exported weights files load with ``weights_only=True``.

    Args:
        path: anything :func:`resolve_checkpoint` accepts.

    Returns:
        ``(state_dict, meta)``: floating tensors in fp32 on the CPU; ``meta`` as in
        ``lrss_meta.json`` (``model``, ``dataset``, ``input_dtype``, ``band_mean``, ``band_std``,
        ``iteration``, ``metrics``) plus ``source`` (the resolved path as a string).

    Raises:
        InputFileError: missing, unreadable or corrupt checkpoint or metadata, naming the file.
    """
    resolved = resolve_checkpoint(path)
    if resolved.is_file():
        state_dict, meta = _load_weights_file(resolved)
    else:
        meta = _read_meta(resolved / META_FILE)
        state_dict = _load_deepspeed_tag(resolved)
    meta["source"] = str(resolved)
    return state_dict, meta


def load_meta(path: str | Path) -> dict[str, Any]:
    """Read only a checkpoint's metadata (``lrss_meta.json``; the whole file for weights files).

    Args:
        path: anything :func:`resolve_checkpoint` accepts.

    Returns:
        the metadata as :func:`load_state` returns it, without consolidating any weights.

    Raises:
        InputFileError: missing or corrupt checkpoint or metadata.
    """
    resolved = resolve_checkpoint(path)
    meta = _load_weights_file(resolved)[1] if resolved.is_file() else _read_meta(resolved / META_FILE)
    meta["source"] = str(resolved)
    return meta


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    builder: ModelBuilder | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model a checkpoint was trained as and load its weights, in eval mode.

    Args:
        path: a run directory, a DeepSpeed checkpoint tag directory or an exported weights file.
        device: where to put the model.
        builder: builds the architecture from ``meta["model"]`` (default
            ``lrss_ds.models.build_model``); tests pass stand-ins.

    Returns:
        ``(model, meta)``: the fp32 model in eval mode and the metadata of :func:`load_state`.

    Raises:
        InputFileError: the checkpoint is missing or corrupt, or its weights do not fit the model
            its config describes.
    """
    state_dict, meta = load_state(path)
    if builder is None:
        from lrss_ds.models import build_model as builder  # models sit below engine; imported late for speed
    config = dict(meta["model"])
    try:
        model = builder(**config)
    except (TypeError, ValueError, KeyError, LrssError) as error:
        raise InputFileError(meta["source"], f"cannot build model from its config {config}: {error}") from error
    _load_into(model, state_dict, meta["source"])
    return model.to(device).eval(), meta


def _load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` strictly, tolerating one wrapper prefix (``module.``) on every key."""
    expected = set(model.state_dict())
    if not expected & set(state_dict):
        for prefix in ("module.", "model."):
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                break
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        missing = sorted(expected - set(state_dict))[:3]
        unexpected = sorted(set(state_dict) - expected)[:3]
        detail = f"missing {missing}, unexpected {unexpected}" if missing or unexpected else str(error).splitlines()[0]
        raise InputFileError(source, f"weights do not fit the model in its config ({detail})") from error


def _read_meta(meta_path: Path) -> dict[str, Any]:
    """Read and check ``lrss_meta.json``."""
    if not meta_path.is_file():
        raise InputFileError(
            meta_path, "missing; a checkpoint tag directory needs the lrss_meta.json the trainer writes"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputFileError(meta_path, f"unreadable or corrupt: {error}") from error
    _check_meta(meta, meta_path)
    return meta


def _check_meta(meta: Any, where: Path) -> None:
    """Raise InputFileError unless ``meta`` has a usable model config and dataset."""
    if not isinstance(meta, dict):
        raise InputFileError(where, "metadata is not a JSON object")
    model = meta.get("model")
    if not isinstance(model, dict) or not {"name", "num_classes", "in_channels"} <= set(model):
        raise InputFileError(where, "metadata 'model' must be the model config with name, num_classes and in_channels")
    if not isinstance(meta.get("dataset"), dict):
        raise InputFileError(where, "metadata 'dataset' must be the dataset spec dict")


def _load_deepspeed_tag(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Consolidate one DeepSpeed tag directory into an fp32 state dict on the CPU."""
    model_files = sorted(tag_dir.glob("*model_states.pt"))
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    if not model_files:
        raise InputFileError(tag_dir, "no DeepSpeed *model_states.pt file in the checkpoint directory")
    if not optim_files:
        # ZeRO stage 0: no optimizer shards; the module's weights are whole in the model states.
        states = _torch_load(model_files[0], weights_only=False)
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, dict):
            raise InputFileError(model_files[0], "not a DeepSpeed model-states file (no 'module' state dict)")
        return {k: _fp32(v) for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # zero_to_fp32 prints progress and a tqdm bar; keep the CLI quiet
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    except Exception as error:  # noqa: BLE001 - any failure here means an unusable checkpoint
        raise InputFileError(
            _first_corrupt(model_files + optim_files) or tag_dir,
            f"cannot consolidate DeepSpeed checkpoint: {type(error).__name__}: {error}",
        ) from error
    return {k: _fp32(v) for k, v in state_dict.items()}


def _first_corrupt(files: list[Path]) -> Path | None:
    """The first of ``files`` that torch cannot open (memory-mapped, so cheap), if any."""
    for file in files:
        try:
            torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except Exception:  # noqa: BLE001 - we only want to know which file is broken
            return file
    return None


def _load_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load an exported weights file (``weights_only=True``) and split it into state and meta."""
    payload = _torch_load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise InputFileError(
            path, f"not an lrss-ds weights file (expected format {WEIGHTS_FORMAT!r}; make one with `lrss-ds export`)"
        )
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise InputFileError(path, "weights file has no state_dict")
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "format")}
    _check_meta(meta, path)
    return {k: _fp32(v) for k, v in state_dict.items()}, meta


def _torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` to the CPU, turning every failure into an InputFileError naming ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as error:  # noqa: BLE001 - pickle, zip and I/O errors all mean "corrupt"
        raise InputFileError(path, f"unreadable or corrupt checkpoint: {torch_load_problem(error)}") from error


def _fp32(value: torch.Tensor) -> torch.Tensor:
    """Floating tensors to contiguous fp32 on the CPU (bf16/fp16 training stores half buffers)."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().to("cpu")
    return value.float().contiguous() if value.is_floating_point() else value.contiguous()
