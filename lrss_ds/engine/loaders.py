"""Training data stream: a resumable per-rank sample order and DataLoader workers reading the store.

Each rank sees an endless stream of sample indices: epoch ``e`` is a permutation of the training
samples drawn from ``seed + e``, padded to a multiple of the world size and dealt round-robin to
the ranks. Position ``p`` in that stream is a plain integer, so a checkpoint stores it and a
resumed run continues with exactly the samples the interrupted one would have seen next.
Workers read whole scenes from the tile store while the training process computes (prefetch).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """Endless, seeded, rank-sharded sample order that starts at a saved position.

    Args:
        num_samples: samples per epoch in the dataset.
        rank: this rank.
        world_size: number of ranks.
        seed: seed of the epoch permutations (equal on every rank).
        start: items of this rank's stream already consumed (from a checkpoint).
        shuffle: permute each epoch (False: 0, 1, 2, ... every epoch).
    """

    def __init__(
        self, num_samples: int, rank: int, world_size: int, seed: int, start: int = 0, shuffle: bool = True
    ) -> None:
        if num_samples < 1:
            raise ValueError("the training split has no samples")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start
        self.shuffle = shuffle
        # Per-rank items per epoch; the permutation is padded by wrapping so ranks stay in step.
        self.per_rank = -(-num_samples // world_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's indices in epoch ``epoch``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order = (order * (total // len(order) + 1))[:total]
        return order[self.rank :: self.world_size]

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(position, index)`` pairs of this rank's stream, from ``start`` on."""
        position = self.start
        while True:
            epoch, offset = divmod(position, self.per_rank)
            for index in self.epoch_order(epoch)[offset:]:
                yield position, index
                position += 1

    def __iter__(self) -> Iterator[int]:
        for _, index in self.positions():
            yield index

    def __len__(self) -> int:  # an epoch's worth; the stream itself never ends
        return self.per_rank


class AugmentedOrder(Sampler[tuple[int, int]]):
    """A :class:`ResumableSampler`'s order with each item's flip/turn: yields ``(index, transform)``.

    The transform is ``lrss_ds.data.augment.transform_number(seed, rank, position)``, so a run
    resumed at a saved position draws the same transforms as the uninterrupted one; the dataset
    (``SceneSamples``) applies it to the image and the label.
    """

    def __init__(self, order: ResumableSampler) -> None:
        self.order = order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from lrss_ds.data.augment import transform_number

        for position, index in self.order.positions():
            yield index, transform_number(self.order.seed, self.order.rank, position)

    def __len__(self) -> int:
        return len(self.order)


def train_order(
    num_samples: int, rank: int, world_size: int, seed: int, start: int, augment: str
) -> ResumableSampler | AugmentedOrder:
    """This rank's training sample order, with flips/turns when ``augment`` is ``d4``.

    Args:
        num_samples / rank / world_size / seed / start: as :class:`ResumableSampler`'s.
        augment: ``train.augment`` (``none`` or ``d4``).
    """
    order = ResumableSampler(num_samples, rank, world_size, seed, start=start)
    return AugmentedOrder(order) if augment == "d4" else order


def _worker_init(worker_id: int, parent: int | None = None) -> None:
    """Make workers ignore SIGTERM (see :func:`make_train_loader`) and die with their parent.

    torch's own check for a dead parent (``ManagerWatchdog``) runs only between samples: a
    worker reading a whole scene outlived a SIGKILLed training process by the rest of that read
    (about 45 s reported for a large scene). On Linux the kernel sends it SIGKILL the moment
    the process that started it (``parent``) dies.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(os.getppid() if parent is None else parent)


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when ``parent`` exits (``PR_SET_PDEATHSIG``; no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


@contextlib.contextmanager
def worker_batches(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """Iterate ``loader`` and shut its worker processes down on leaving, exception or not.

    Workers ignore SIGTERM (see :func:`make_train_loader`), and that is the signal
    ``multiprocessing``'s exit hook uses on daemonic children before joining them. An exception
    keeps a live iterator in its traceback until after that hook, so without this the interpreter
    waited for a worker that would never stop (found here: a failed run hung at exit forever).
    """
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        # torch's own clean-up: ask workers to stop, join them; no public API does this.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        # torch then SIGTERMs a worker that did not stop within its join timeout (one still
        # reading a whole scene), which ours ignore: kill it, nothing of its work is wanted now.
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join()


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``image (C,H,W)`` to ``(B,C,H,W)`` and ``label (H,W)`` to ``(B,H,W)``, keep names.

    Dtypes are kept (uint8 stays uint8 until inside the model's first segment).
    """
    return {
        "image": torch.stack([item["image"] for item in items]),
        "label": torch.stack([item["label"] for item in items]),
        "scene": [item["scene"] for item in items],
        "window": [tuple(item["window"]) for item in items],
    }


def pin_for(device: torch.device) -> bool:
    """Whether batches bound for ``device`` are collated into pinned (page-locked) host memory.

    A copy to an accelerator with ``non_blocking=True`` overlaps the host only from pinned
    memory; from pageable memory it waits for the copy. On the CPU there is no copy to make.
    """
    return device.type != "cpu"


def make_train_loader(
    dataset: Dataset, sampler: Sampler, batch_size: int, workers: int, prefetch: int, device: torch.device
) -> DataLoader:
    """DataLoader over ``dataset`` in ``sampler``'s order, read ahead by ``workers`` processes.

    Workers ignore SIGTERM: SLURM and the ``deepspeed`` launcher signal the whole process tree,
    and a worker killed by it would make the DataLoader raise in the training process before
    that process has saved its preemption checkpoint. Workers still exit with their parent.

    Args:
        dataset: ``SceneSamples`` of the training split.
        sampler: this rank's order (:func:`train_order`).
        batch_size: micro-batch size (1 scene in holistic mode).
        workers: worker processes (0: read in this process).
        prefetch: batches each worker reads ahead.
        device: where the batches go (the engine's device); decides :func:`pin_for`.

    Returns:
        The loader; iterate it once (the sampler is endless).
    """
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": prefetch, "persistent_workers": False,
                 "worker_init_fn": functools.partial(_worker_init, parent=os.getpid())}
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        pin_memory=pin_for(device), **extra,
    )


def make_eval_loader(
    dataset: Dataset, rank: int, world_size: int, workers: int, device: torch.device
) -> tuple[DataLoader, int]:
    """DataLoader over this rank's share (``rank::world_size``) of the evaluation samples, in order.

    Every rank gets the same number of batches (a short share is padded by repeating its first
    sample, or sample 0), because under ZeRO-3 each forward gathers parameters collectively and a
    rank that stopped early would leave the others waiting. Only the first ``count`` batches
    are real.

    Args:
        dataset: ``SceneSamples`` of the validation split (whole scenes).
        rank: this rank.
        world_size: number of ranks.
        workers: worker processes.
        device: where the batches go (the engine's device); decides :func:`pin_for`.

    Returns:
        ``(loader, count)``: a finite loader of batches of one scene, and how many are real.
    """
    indices = list(range(rank, len(dataset), world_size))
    count = len(indices)
    per_rank = -(-len(dataset) // world_size)
    indices += [indices[0] if indices else 0] * (per_rank - count)
    extra: dict[str, Any] = {"worker_init_fn": functools.partial(_worker_init, parent=os.getpid())} if workers else {}
    loader = DataLoader(
        dataset, batch_size=1, sampler=indices, num_workers=min(workers, len(indices)), collate_fn=collate,
        pin_memory=pin_for(device), **extra,
    )
    return loader, count
