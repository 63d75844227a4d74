"""Many scenes in one `lrss-ds predict`: scenes split over launcher ranks, finished maps skipped, predictions.json.

Under the ``deepspeed`` launcher (or ``torchrun``) every rank loads its own model copy and
takes scenes ``rank, rank + N, ...`` of the sorted list; ranks sharing a host split its cores
(``lrss_ds.engine.setup.init_distributed``: ``cores // local ranks`` threads each, unless
``OMP_NUM_THREADS`` is set — ``torchrun`` sets it to 1). With ``--resume`` a scene whose map
(and probabilities) already exist and open with the scene's size and band count is skipped
with a message, so a killed batch continues where it stopped; maps only ever appear at their
final name complete (``write_prediction`` renames a finished temporary).

``predictions.json`` beside the maps holds one record per scene (scene, size, seconds, peak
memory, model, checkpoint). Each rank writes its records to a part file of its own as each
scene finishes (atomically); after the last scene and a barrier, rank 0 folds every part
(also those left by a killed run) into ``predictions.json`` and removes them. A record of a
later run replaces the earlier record of the same scene.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import rasterio
import torch

from lrss_ds.engine.resident_memory import PeakMemory
from lrss_ds.engine.temporaries import write_atomically
from lrss_ds.errors import OutputExistsError

SUMMARY = "predictions.json"
PART_GLOB = ".predictions.part-*.json"

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launched job.

    Attributes:
        rank: global rank; world_size: number of ranks; local_rank: rank on this host.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def join(cls) -> "Ranks":
        """Join the job a launcher started (``WORLD_SIZE > 1``), else a single rank without a process group."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from lrss_ds.engine.setup import init_distributed  # DeepSpeed import only for launched jobs

        info = init_distributed()
        return cls(info.rank, info.world_size, info.local_rank)

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: ``rank, rank + world_size, ...``."""
        return list(items[self.rank :: self.world_size])

    def device(self, device: torch.device) -> torch.device:
        """One accelerator per local rank when ``device`` names a type without an index."""
        if self.world_size > 1 and device.type != "cpu" and device.index is None:
            return torch.device(device.type, self.local_rank)
        return device

    def barrier(self) -> None:
        """Wait for every rank (no-op for one rank)."""
        if self.world_size > 1:
            from lrss_ds.engine import comm

            comm.barrier()


def unfinished_reason(path: Path, height: int, width: int, bands: int) -> str | None:
    """Why ``path`` is not a finished output of a ``bands x height x width`` scene (None if it is).

    Args:
        path: an existing map or probability file.
        height, width: the scene's size.
        bands: 1 for a class map, K for probabilities.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                found = (ds.count, ds.height, ds.width)
    except rasterio.errors.RasterioIOError as error:
        return f"does not open ({str(error).splitlines()[0]})"
    if found != (bands, height, width):
        return f"holds {found[0]} x {found[1]} x {found[2]}, the scene needs {bands} x {height} x {width}"
    return None


def pending(
    jobs: Iterable[tuple[Any, tuple[Path, Path | None]]],
    num_classes: int,
    resume: bool,
    overwrite: bool,
    on_skip: Callable[[Any, Path, Path | None], None],
) -> list[tuple[Any, tuple[Path, Path | None]]]:
    """The jobs still to run: with ``resume``, scenes whose outputs are all finished are skipped.

    Args:
        jobs: ``(source, (map path, probabilities path or None))``; a source has ``name``,
            ``where``, ``height`` and ``width``.
        num_classes: K (the probability file's band count).
        resume: skip finished scenes.
        overwrite: replace outputs that exist but are not finished ones.
        on_skip: called with ``(source, map path, probabilities path)`` of each skipped scene.

    Raises:
        OutputExistsError: with ``resume`` and without ``overwrite``, an output exists but is
            not a finished output of its scene.
    """
    todo = []
    for source, (output, probabilities) in jobs:
        if resume:
            wanted = [(output, 1)] + ([(probabilities, num_classes)] if probabilities else [])
            reasons = {p: unfinished_reason(p, source.height, source.width, k) for p, k in wanted if p.exists()}
            if len(reasons) == len(wanted) and not any(reasons.values()):
                on_skip(source, output, probabilities)
                continue
            bad = next(((p, r) for p, r in reasons.items() if r), None)
            if bad and not overwrite:
                raise OutputExistsError(bad[0], f"exists but is not a finished output of {source.where}: {bad[1]}; "
                                                "pass --overwrite to replace it")
        todo.append((source, (output, probabilities)))
    return todo


class PredictionLog:
    """The per-scene records of one rank, and the merge of every rank's into ``predictions.json``.

    A scene skipped as finished gets a record without time and memory (``seconds`` None) unless
    an earlier run recorded it: a run killed between renaming a map and recording it leaves
    such a scene.

    Args:
        directory: where the maps go (``predictions.json`` is written there).
        common: fields of every record (``model``, ``checkpoint``, ``rank``, ``threads``).
        say: where messages go (a progress bar's ``write``).
    """

    def __init__(self, directory: Path, common: dict[str, Any], say: Callable[[str], Any] = print) -> None:
        self.directory = Path(directory)
        self.common = common
        self.say = say
        self.part = self.directory / f".predictions.part-{socket.gethostname()}-{os.getpid()}.json"
        self.records: list[dict[str, Any]] = []

    def skip(self, source: Any, output: Path, probabilities: Path | None) -> None:
        """Say that a scene is skipped as finished, and record it (untimed)."""
        self.say(f"skip {source.where}: {output} is finished (--resume)")
        self._record(source, output, probabilities, None, None)

    def add(self, source: Any, output: Path, probabilities: Path | None, seconds: float, peak: PeakMemory,
            **extra: Any) -> None:
        """Record one scene predicted by this run (``extra``: more fields of its record)."""
        self._record(source, output, probabilities, round(seconds, 3), peak, **extra)

    def _record(self, source: Any, output: Path, probabilities: Path | None, seconds: float | None,
                peak: PeakMemory | None, **extra: Any) -> None:
        """Append a record and rewrite this rank's part file."""
        self.records.append({
            "scene": source.name,
            "input": source.where,
            "output": str(output),
            "probabilities": str(probabilities) if probabilities else None,
            "size": [source.height, source.width],
            "seconds": seconds,
            "peak_rss_gib": round(peak.gib(), 4) if peak else None,
            "peak_rss_source": peak.source if peak else None,
            **self.common,
            **extra,
        })
        _write_json(self.part, self.records)

    def merge(self) -> Path:
        """Fold ``predictions.json`` and every part file into ``predictions.json`` (rank 0, after a barrier)."""
        summary = self.directory / SUMMARY
        by_scene: dict[str, dict[str, Any]] = {}
        if summary.exists():
            for record in json.loads(summary.read_text()).get("scenes", []):
                by_scene[record["scene"]] = record
        parts = sorted(self.directory.glob(PART_GLOB), key=lambda p: p.stat().st_mtime)
        for part in parts:  # oldest first: a later run's record of a scene wins
            for record in json.loads(part.read_text()):
                if record["seconds"] is not None or record["scene"] not in by_scene:
                    by_scene[record["scene"]] = record
        _write_json(summary, {"scenes": [by_scene[name] for name in sorted(by_scene)]})
        for part in parts:
            part.unlink(missing_ok=True)
        return summary


def _write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON under a temporary name, then rename it to ``path``."""
    with write_atomically(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1))


def timed(fn: Callable[[], None]) -> tuple[float, PeakMemory]:
    """Run ``fn``; return its wall seconds and the peak memory over it."""
    peak = PeakMemory()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, peak


__all__ = ["PredictionLog", "Ranks", "pending", "timed", "unfinished_reason"]
