"""A spatial group: the ranks sharing one scene, the collectives they use and their band table."""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor


class Collectives(Protocol):
    """The collectives spatial layers use; ``lrss_ds.engine.comm`` provides them as module functions."""

    def all_reduce(self, tensor: Tensor, op: Any = None, group: Any = None) -> Tensor:
        """Sum ``tensor`` over ``group``; the result on ``tensor``'s device."""
        ...

    def exchange(
        self, sends: Mapping[int, Tensor], receives: Mapping[int, Sequence[int]], like: Tensor, group: Any = None
    ) -> dict[int, Tensor]:
        """Send ``sends[peer]`` to each peer, receive ``receives[peer]``-shaped tensors from each."""
        ...


class SpatialGroup:
    """The ranks that split one scene into bands, and the band heights of the current forward.

    Band heights are known at the input's resolution (:meth:`begin`, once per forward); a layer
    at another resolution derives its table with :meth:`level_rows` from its own band height.

    Args:
        comm: the collectives (the engine passes ``lrss_ds.engine.comm``).
        rank: this rank's index in the group (band ``rank`` from the top).
        size: ranks in the group.
        group: the ``torch.distributed`` process group of these ranks (None: the world).
        pad_multiple: what the model pads the scene's height to (its total stride).

    Attributes:
        halo_bytes_sent: bytes this rank has sent to its peers in halo exchanges (forward and
            backward), for the traffic a benchmark reports.
    """

    def __init__(self, comm: Collectives, rank: int, size: int, group: Any = None, pad_multiple: int = 1) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"spatial rank {rank} outside a group of {size}")
        self.comm = comm
        self.rank = rank
        self.size = size
        self.group = group
        self.pad_multiple = pad_multiple
        self.rows: list[int] | None = None
        self.local = False  # the spatial layers compute as their one-rank selves (local_layers)
        self.halo_bytes_sent = 0

    def exchange(
        self, sends: Mapping[int, Tensor], receives: Mapping[int, Sequence[int]], like: Tensor
    ) -> dict[int, Tensor]:
        """``comm.exchange`` among this group's ranks, adding the bytes sent to :attr:`halo_bytes_sent`."""
        self.halo_bytes_sent += sum(t.numel() * t.element_size() for t in sends.values())
        return self.comm.exchange(sends, receives, like, self.group)

    @property
    def first(self) -> bool:
        """This rank holds the scene's top band."""
        return self.rank == 0

    @property
    def last(self) -> bool:
        """This rank holds the scene's bottom band (the one padded at the scene's edge)."""
        return self.rank == self.size - 1

    @contextlib.contextmanager
    def local_layers(self) -> Iterator[None]:
        """Within the context this rank's halo convolutions and resizes are their one-rank layers.

        For a block that already holds the rows they read across the band boundary (a halo
        fetched once for a chain of layers); they then exchange nothing. BatchNorm in eval mode
        needs no switch (it uses its running statistics).
        """
        before, self.local = self.local, True
        try:
            yield
        finally:
            self.local = before

    def begin(self, input_rows: int) -> list[int]:
        """Learn every rank's padded input band height for this forward (a collective).

        Args:
            input_rows: rows of this rank's input band before padding.

        Returns:
            the padded band heights, top to bottom (kept in :attr:`rows`).

        Raises:
            ValueError: a band other than the last is not a multiple of ``pad_multiple``.
        """
        padded = math.ceil(input_rows / self.pad_multiple) * self.pad_multiple
        if not self.last and padded != input_rows:
            raise ValueError(
                f"spatial rank {self.rank}: its band of {input_rows} rows is not a multiple of the network's "
                f"total stride {self.pad_multiple}; cut the scene with lrss_ds.parallel.band_bounds"
            )
        mine = torch.zeros(self.size, dtype=torch.int64)
        mine[self.rank] = padded
        self.rows = [int(v) for v in self.comm.all_reduce(mine, group=self.group).tolist()]
        return self.rows

    def level_rows(self, local_rows: int) -> list[int]:
        """Every rank's band height at the resolution where this rank's band has ``local_rows``.

        Raises:
            RuntimeError: no :meth:`begin` this forward, or the resolution does not divide the bands.
        """
        if self.rows is None:
            raise RuntimeError("spatial layer ran before SpatialGroup.begin (is the model spatialized?)")
        if local_rows < 1:
            raise RuntimeError(f"spatial rank {self.rank}: a band of {local_rows} rows at some layer")
        scale = Fraction(local_rows, self.rows[self.rank])
        level = [Fraction(rows) * scale for rows in self.rows]
        if any(rows.denominator != 1 for rows in level):
            raise RuntimeError(
                f"bands {self.rows} do not divide at a resolution of {scale} of the input; band heights must be "
                f"multiples of the network's total stride"
            )
        return [int(rows) for rows in level]
