"""Checkpoint layout of a run: DeepSpeed tags, per-rank RNG state, ``lrss_meta.json``, retention.

``OUT/checkpoints/`` holds DeepSpeed tags ``step_%07d`` (model, optimizer shards, client LR
scheduler and ``client_state`` with the iteration and data position), DeepSpeed's ``latest`` file,
and ``best`` (the tag with the highest validation mIoU, same format as ``latest``). Each tag also
holds ``rng_rank<r>.pt`` (every rank's python/numpy/torch RNG state: ranks differ, and DeepSpeed's
``client_state`` is written by rank 0 only) and ``lrss_meta.json`` (what prediction needs to
rebuild the model and read inputs, see the contract).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrss_ds.engine.comm import barrier
from lrss_ds.engine.metrics import jsonable

TAG_PATTERN = re.compile(r"^step_(\d{7})$")


def tag_for(iteration: int) -> str:
    """The checkpoint tag of ``iteration`` optimizer steps: ``step_0000042``."""
    return f"step_{iteration:07d}"


def rng_state() -> dict[str, Any]:
    """This process's python, numpy and torch (CPU) RNG states, and the accelerator's.

    An accelerator keeps its own generator (CUDA one per device), which dropout and any random
    op on the device draw from; ``torch.get_rng_state`` is the CPU one only. It is asked of
    ``deepspeed.accelerator.get_accelerator()`` and saved under ``"accelerator"`` with the
    accelerator's name. The CPU accelerator's generator is the CPU one, saved already.
    """
    from deepspeed.accelerator import get_accelerator

    state: dict[str, Any] = {
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
    }
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = {"name": accelerator.device_name(), "state": accelerator.get_rng_state()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned.

    A state without ``"accelerator"`` (written before it was saved, or on the CPU accelerator)
    restores the other generators and leaves the accelerator's as seeded. One saved on another
    accelerator than this process's is not restored (its generator does not exist here), with a
    warning: the run continues from the checkpoint with fresh device draws.
    """
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved = state.get("accelerator")
    if saved is None:
        return
    accelerator = get_accelerator()
    if saved["name"] != accelerator.device_name():
        logging.getLogger(__name__).warning(
            "the checkpoint's %s RNG state is not restored on the %s accelerator",
            saved["name"], accelerator.device_name(),
        )
        return
    accelerator.set_rng_state(saved["state"])


def write_json(path: Path, data: Any) -> None:
    """Write JSON under a temporary name, then rename (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def save(
    engine: Any,
    root: Path,
    iteration: int,
    client_state: dict[str, Any],
    meta: dict[str, Any],
    rank: int,
) -> Path:
    """Save a checkpoint of every rank at ``iteration`` (collective: all ranks call it).

    Args:
        engine: the DeepSpeed engine.
        root: ``OUT/checkpoints``.
        iteration: optimizer steps done.
        client_state: iteration, data position and anything else to restore (rank 0's copy is kept).
        meta: the ``lrss_meta.json`` content (written by rank 0 after the tag is complete).
        rank: this rank.

    Returns:
        The tag directory.
    """
    tag = tag_for(iteration)
    tag_dir = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    barrier()  # every rank's files are on disk before the tag is declared complete
    if rank == 0:
        write_json(tag_dir / "lrss_meta.json", meta)
    barrier()
    return tag_dir


def latest_tag(root: Path) -> str | None:
    """The tag named by DeepSpeed's ``latest`` file, or None when there is none."""
    latest = root / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine: Any, root: Path, rank: int) -> dict[str, Any] | None:
    """Restore the ``latest`` checkpoint under ``root`` into ``engine`` and this process's RNGs.

    Args:
        engine: the DeepSpeed engine (built exactly like the one that saved).
        root: ``OUT/checkpoints``.
        rank: this rank.

    Returns:
        The saved ``client_state``, or None when ``root`` has no checkpoint yet.
    """
    tag = latest_tag(root)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        return None
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        # weights_only=False: the file holds python/numpy RNG tuples that this run wrote itself.
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def read_best(root: Path) -> tuple[str | None, float]:
    """``(tag, miou)`` of the best checkpoint so far, or ``(None, -inf)``."""
    path = root / "best.json"
    if not path.is_file():
        return None, float("-inf")
    data = json.loads(path.read_text())
    return data["tag"], float(data["miou"])


def mark_best(root: Path, tag: str, miou: float) -> None:
    """Record ``tag`` as the best checkpoint: ``best`` (tag name, like ``latest``) and ``best.json``."""
    write_json(root / "best.json", {"tag": tag, "miou": miou})
    tmp = root / "best.tmp"
    tmp.write_text(tag)
    tmp.replace(root / "best")


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete tags other than the last ``keep_last``, ``latest`` and ``best`` (rank 0 only).

    Args:
        root: ``OUT/checkpoints``.
        keep_last: number of most recent tags kept.

    Returns:
        The deleted tag names.
    """
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    keep = set(tags[-keep_last:]) if keep_last > 0 else set()
    keep |= {t for t in (latest_tag(root), read_best(root)[0]) if t}
    deleted = []
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(root / tag, ignore_errors=True)
            deleted.append(tag)
    return deleted
