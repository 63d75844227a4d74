"""Checkpoint layout of a run: DeepSpeed tags, per-rank RNG state, ``lrss_meta.json``, retention.

``OUT/checkpoints/`` holds DeepSpeed tags ``step_%07d`` (model, optimizer shards, client LR
scheduler and ``client_state`` with the iteration and data position), DeepSpeed's ``latest`` file,
and ``best`` (the tag with the highest validation mIoU, same format as ``latest``). Each tag also
holds ``rng_rank<r>.pt`` (every rank's python/numpy/torch RNG state: ranks differ, and DeepSpeed's
``client_state`` is written by rank 0 only) and ``lrss_meta.json`` (what prediction needs to
rebuild the model and read inputs, see the contract).

A tag is written as ``step_%07d.partial`` and renamed to its final name by rank 0 only after every
rank's files are on disk and ``lrss_complete.json`` (every file's size, written last) is in it;
``latest`` is updated after the rename. A save that fails (a full disk) removes its partial
directory, so ``--resume`` sees only whole tags, and takes the newest one whose files match its
marker (a file truncated or lost later is found that way).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lrss_ds.engine.comm import barrier
from lrss_ds.engine.metrics import jsonable
from lrss_ds.engine.temporaries import write_text_atomically
from lrss_ds.errors import TrainingError

TAG_PATTERN = re.compile(r"^step_(\d{7})$")
PARTIAL_SUFFIX = ".partial"
COMPLETE_MARKER = "lrss_complete.json"
# A write that came up short with less than this left on the device means the device filled up:
# the short write itself used up what space there was (torch's writer reports it only as
# "[enforce fail at inline_container.cc] unexpected pos", without an errno).
FULL_DISK_MARGIN = 64 << 20


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
    write_text_atomically(path, json.dumps(jsonable(data), indent=2) + "\n")


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

    Raises:
        TrainingError: a file could not be written (full disk, no permission); the partial tag
            is removed and ``latest`` still names the previous checkpoint.
    """
    tag = tag_for(iteration)
    partial = root / (tag + PARTIAL_SUFFIX)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # what a save killed midway left
    barrier()
    with _save_failure_reported(root, tag, partial):
        engine.save_checkpoint(str(root), tag=partial.name, client_state=client_state, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
    barrier()  # every rank's files are on disk before the tag is declared complete
    if rank == 0:
        with _save_failure_reported(root, tag, partial):
            write_json(partial / "lrss_meta.json", meta)
            _commit(root, tag, partial)
    barrier()
    return root / tag


def _commit(root: Path, tag: str, partial: Path) -> None:
    """Write the completion marker into ``partial``, rename it to ``tag``, point ``latest`` at it."""
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    write_json(partial / COMPLETE_MARKER, {"tag": tag, "files": files})
    final = root / tag
    if final.exists():  # an earlier save of this iteration (a resumed run passing it again)
        shutil.rmtree(final)
    partial.rename(final)
    write_text_atomically(root / "latest", tag)


@contextlib.contextmanager
def _save_failure_reported(root: Path, tag: str, partial: Path) -> Iterator[None]:
    """Turn a failed write into one TrainingError line and remove the partial tag."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        free = _free_bytes(root)
        shutil.rmtree(partial, ignore_errors=True)
        previous, _ = find_resumable(root)
        kept = f"{previous} stays the checkpoint --resume uses" if previous else "there is no earlier checkpoint"
        raise TrainingError(root, f"cannot save checkpoint {tag}: {_write_failure(error, free)}; "
                                  f"nothing of it was kept, {kept}") from error


def _free_bytes(path: Path) -> int | None:
    """Bytes free on the file system holding ``path`` (None when it cannot be asked)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _write_failure(error: BaseException, free: int | None) -> str:
    """Why a checkpoint write failed, in words: a full disk is said as such."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.errno is not None:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return "the disk is full" + (f" ({free / (1 << 20):.0f} MiB free)" if free is not None else "")
        return error.strerror or text
    short_write = "unexpected pos" in text or "file write failed" in text or "iostream error" in text
    if short_write and free is not None and free < FULL_DISK_MARGIN:
        return f"the disk is full ({free / (1 << 20):.0f} MiB free)"
    first_line = text.splitlines()[0] if text else type(error).__name__
    return f"write failed ({first_line})"


def tags(root: Path) -> list[str]:
    """The (renamed, so fully saved once) tags under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def intact_problem(tag_dir: Path) -> str | None:
    """What is wrong with a saved tag, or None when every file its marker lists is there whole."""
    try:
        marker = json.loads((tag_dir / COMPLETE_MARKER).read_text())
        files = dict(marker["files"])
    except FileNotFoundError:
        return f"has no {COMPLETE_MARKER} (its save did not finish)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {COMPLETE_MARKER}"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != size:
            return f"has {name} cut to {path.stat().st_size} of {size} bytes"
    return None


def find_resumable(root: Path) -> tuple[str | None, list[str]]:
    """The newest intact tag under ``root`` and what is wrong with each newer one.

    Returns:
        ``(tag or None, ["step_0000004 lacks mp_rank_00_model_states.pt", ...])``.
    """
    broken = []
    for tag in reversed(tags(root)):
        problem = intact_problem(root / tag)
        if problem is None:
            return tag, broken
        broken.append(f"{tag} {problem}")
    return None, broken


def resume_differences(tag_dir: Path, meta: dict[str, Any]) -> list[str]:
    """What differs between the run a tag was saved by and this one (model, classes, input dtype).

    Args:
        tag_dir: the checkpoint.
        meta: this run's ``lrss_meta.json`` content (without the iteration).

    Returns:
        One ``"key: saved in the checkpoint, now"`` entry per difference (empty: it can resume).
    """
    saved = json.loads((tag_dir / "lrss_meta.json").read_text())
    pairs = {f"model.{k}": (saved.get("model", {}).get(k), v) for k, v in meta["model"].items()}
    pairs["dataset.classes"] = (saved.get("dataset", {}).get("classes"), meta["dataset"].get("classes"))
    pairs["input dtype"] = (saved.get("input_dtype"), meta.get("input_dtype"))
    return [f"{key} {old} in the checkpoint, {new} now" for key, (old, new) in pairs.items() if old != new]


def latest_tag(root: Path) -> str | None:
    """The tag named by DeepSpeed's ``latest`` file, or None when there is none."""
    latest = root / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load(engine: Any, root: Path, rank: int, tag: str | None = None) -> dict[str, Any] | None:
    """Restore checkpoint ``tag`` (default: ``latest``) under ``root`` into ``engine`` and the RNGs.

    Args:
        engine: the DeepSpeed engine (built exactly like the one that saved).
        root: ``OUT/checkpoints``.
        rank: this rank.
        tag: the tag to load (e.g. from :func:`find_resumable`).

    Returns:
        The saved ``client_state``, or None when ``root`` has no checkpoint yet.
    """
    tag = tag or latest_tag(root)
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
    write_text_atomically(root / "best", tag)


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete tags other than the last ``keep_last``, ``latest`` and ``best``, and partial tags (rank 0 only).

    Args:
        root: ``OUT/checkpoints``.
        keep_last: number of most recent tags kept.

    Returns:
        The deleted tag names.
    """
    names = tags(root)
    keep = set(names[-keep_last:]) if keep_last > 0 else set()
    keep |= {t for t in (latest_tag(root), read_best(root)[0]) if t}
    deleted = []
    for tag in names:
        if tag not in keep:
            shutil.rmtree(root / tag, ignore_errors=True)
            deleted.append(tag)
    for partial in root.glob("*" + PARTIAL_SUFFIX):  # a save killed midway; none is running now
        shutil.rmtree(partial, ignore_errors=True)
    return deleted
