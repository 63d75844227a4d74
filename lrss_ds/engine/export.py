"""`lrss-ds export`: consolidate a (ZeRO-sharded) checkpoint into one fp32 weights file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from lrss_ds.engine.temporaries import write_atomically
from lrss_ds.engine.model_io import WEIGHTS_FORMAT, load_model
from lrss_ds.errors import OutputError, OutputExistsError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lrss-ds export`` options to ``parser``."""
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, checkpoints directory or DeepSpeed tag directory"
    )
    parser.add_argument("--output", required=True, help="weights file to write (e.g. model.pt)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds export``; returns the exit code."""
    output = export_weights(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"wrote {output}")
    return 0


def export_weights(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write one self-contained fp32 weights file for a checkpoint.

    The file is a plain dict of tensors, strings, numbers and lists, so
    ``torch.load(path, weights_only=True)`` reads it: ``format`` (``"lrss_ds.weights.v1"``),
    ``model`` (the config ``build_model(**model)`` takes), ``dataset`` (``DatasetSpec.to_dict()``),
    ``input_dtype``, ``band_mean``, ``band_std``, ``iteration``, ``metrics`` and ``state_dict``
    (fp32; the band statistics are also inside it, in the normaliser's buffers). The model is
    built and loaded once before writing, so a checkpoint whose weights do not fit its config
    is refused rather than exported.

    Args:
        checkpoint: a run directory, checkpoints directory, DeepSpeed tag directory, or an
            exported weights file (re-exported as is).
        output: the weights file to write; written under a temporary name, then renamed.
        overwrite: replace ``output`` if it exists.

    Returns:
        the path written.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
        OutputError: ``output`` is a directory, or cannot be written (full disk, read-only
            directory); an earlier file at ``output`` is then unchanged.
        InputFileError: the checkpoint is missing or corrupt.
    """
    output = Path(output)
    if output.is_dir():
        raise OutputError(output, "is a directory; --output is the weights file to write, e.g. model.pt")
    if output.exists() and not overwrite:
        raise OutputExistsError(output, "already exists; pass --overwrite to replace it")
    model, meta = load_model(checkpoint)
    payload: dict[str, Any] = {
        "format": WEIGHTS_FORMAT,
        "model": meta["model"],
        "dataset": meta["dataset"],
        "input_dtype": meta.get("input_dtype"),
        "band_mean": meta.get("band_mean"),
        "band_std": meta.get("band_std"),
        "iteration": meta.get("iteration"),
        "metrics": _plain(meta.get("metrics") or {}),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
    }
    with write_atomically(output) as temporary, open(temporary, "wb") as file:
        # Through a Python file, a full disk is an OSError with its errno; torch's own writer
        # reports it as an untyped RuntimeError ("PytorchStreamWriter failed writing file").
        torch.save(payload, file)
    return output


def _plain(value: Any) -> Any:
    """Keep only what ``weights_only=True`` unpickles: dicts, lists, str, int, float, bool, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
