"""Spatial parallelism: one scene split over N ranks in horizontal bands, equal to one rank.

Each rank of a spatial group holds one band of rows of the scene (:func:`band_bounds`); the
model's convolutions, BatchNorm layers and bilinear resampling are swapped for versions that
exchange the rows they read across a band boundary and reduce their statistics over the group
(:func:`spatialize`), and :class:`SpatialLoss` divides by the scene's valid-pixel count. The sum
of the ranks' losses and of their parameter gradients equals one rank's on the whole scene.

Where it lives: its own layer, between ``memory`` and ``engine``
(``data -> models -> memory -> parallel -> engine -> cli``). It is not a memory lever (the
ledger, checkpointing and offload act within one rank and apply per rank here), and it changes
what a forward computes, which the memory layer never does. It sits below the engine because
the engine builds spatial models, and so it cannot import ``lrss_ds.engine.comm``: the
collectives it needs are handed to it as an object (:class:`Collectives`, which the engine's
``comm`` module satisfies as it is), so every tensor collective still goes through
``lrss_ds/engine/comm.py`` and no layer imports upwards.

Usage (every rank, inside an initialised process group)::

    from lrss_ds.engine import comm
    group = SpatialGroup(comm, rank, size)            # a group of the spatial ranks
    spatialize(model, group)                          # in place; parameters are kept
    start, stop = band_bounds(H, size, model.pad_multiple)[rank]
    loss = SpatialLoss(loss_fn, group)(model(image[..., start:stop, :]), label[..., start:stop, :])
    loss.backward()                                   # then sum the parameter gradients over the group

Under DeepSpeed the sum is ZeRO's own gradient reduction: ``deepspeed.initialize(mpu=
SpatialTopology(N))`` (``lrss_ds.engine.spatial_groups``) makes the spatial groups DeepSpeed's
sequence-parallel groups, and ``engine.seq_parallel_group`` is the group to pass here.

Halo exchange is point-to-point (``comm.exchange``) rather than an ``all_gather`` of boundary
rows: each rank moves only the rows its neighbours read (an all_gather would bring every
rank's boundary rows to every rank, N times the traffic), band heights may differ (all_gather
needs equal shapes), a halo taller than a neighbour's band is served by every rank it lies on,
and the backward is the mirror exchange: each halo row's gradient goes back to its owner and is
added there, with no reduction.
"""

from __future__ import annotations

from lrss_ds.parallel.batchnorm import SpatialBatchNorm2d
from lrss_ds.parallel.convert import spatialize
from lrss_ds.parallel.group import Collectives, SpatialGroup
from lrss_ds.parallel.halo import HaloConv2d, SpatialResize, halo_rows
from lrss_ds.parallel.loss import SpatialLoss
from lrss_ds.parallel.partition import band_bounds

__all__ = [
    "Collectives",
    "HaloConv2d",
    "SpatialBatchNorm2d",
    "SpatialGroup",
    "SpatialLoss",
    "SpatialResize",
    "band_bounds",
    "halo_rows",
    "spatialize",
]
