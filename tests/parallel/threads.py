"""A spatial group of threads in one process: the collectives of ``lrss_ds.engine.comm`` between threads.

The layers' arithmetic and the order of their collectives are checked here in one process
(CPU autograd runs each backward on the thread that calls it); the gloo tests check the same
through ``torch.distributed``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor


class ThreadComm:
    """``all_reduce`` (sum) and ``exchange`` between ``size`` threads; ``rank`` from the calling thread."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list[Any] = [None] * size
        self.local = threading.local()
        self.calls = 0

    @property
    def rank(self) -> int:
        return self.local.rank

    def all_reduce(self, tensor: Tensor, op: Any = None, group: Any = None) -> Tensor:
        self.slots[self.rank] = tensor.clone()
        self.barrier.wait()
        total = sum(self.slots[1:], self.slots[0].clone())
        self.barrier.wait()
        if self.rank == 0:
            self.calls += 1
        return total

    def exchange(
        self, sends: Mapping[int, Tensor], receives: Mapping[int, Sequence[int]], like: Tensor, group: Any = None
    ) -> dict[int, Tensor]:
        # every rank of the group takes part here (real p2p does not need to): the threads share one barrier
        self.slots[self.rank] = {peer: t.clone() for peer, t in sends.items()}
        self.barrier.wait()
        got = {peer: self.slots[peer][self.rank] for peer in receives}
        self.barrier.wait()
        for peer, shape in receives.items():
            assert tuple(got[peer].shape) == tuple(shape), (peer, got[peer].shape, shape)
        return got


def run_threads(size: int, work: Callable[[int, ThreadComm], Any]) -> list[Any]:
    """``work(rank, comm)`` on ``size`` threads; their results in rank order (a thread's error re-raised)."""
    comm = ThreadComm(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        comm.local.rank = rank
        torch.set_num_threads(1)
        try:
            results[rank] = work(rank, comm)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors.append(error)
            comm.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
