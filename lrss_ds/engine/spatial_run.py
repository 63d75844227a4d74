"""Spatial parallelism in the trainer: the groups, the spatial model and loss, and each rank's band of the data.

With ``parallel.spatial: N`` the world is ``N x data`` ranks: consecutive groups of ``N`` ranks
(:class:`~lrss_ds.engine.spatial_groups.SpatialTopology`) share one scene, each holding one band
of its rows. :func:`start_spatial` builds the groups, checks the scenes can be cut, turns the
model into its spatial version (``lrss_ds.parallel.spatialize``) and returns a
:class:`SpatialRun`, which the trainer asks for the DeepSpeed ``mpu``, the loss, the datasets
and the data-parallel shard. DeepSpeed then sums the band gradients over the spatial group and
averages them over the data copies (``spatial_groups``' docstring says how).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from lrss_ds.engine import comm
from lrss_ds.engine.config import ExperimentConfig
from lrss_ds.engine.spatial_groups import SpatialTopology
from lrss_ds.errors import ConfigError

# Measured (HRNet-FCN, 128x64 scene, 2 SGD steps, ds_configs/zero3_offload.json): the spatial run
# trains, but its second loss is 4e-3 from one rank's where ZeRO-2's is 1.3e-4, so ZeRO-3's
# gradient reduction over the spatial groups is not shown to sum the bands.
ZERO3_REFUSAL = (
    "ZeRO-3 with spatial groups trains but does not match one rank (second loss 4e-3 apart, ZeRO-2 1.3e-4); "
    "use ZeRO stage 0-2"
)


@dataclass
class SpatialRun:
    """This rank's place in spatial x data parallelism and what the trainer builds from it.

    Attributes:
        topology: the process groups (DeepSpeed's ``mpu``).
        group: the ``lrss_ds.parallel.SpatialGroup`` of this rank's scene.
        pad_multiple: the network's total stride; every band but the last is a multiple of it.
    """

    topology: SpatialTopology
    group: Any
    pad_multiple: int

    @property
    def size(self) -> int:
        """Ranks per scene."""
        return self.topology.spatial

    @property
    def data_rank(self) -> int:
        """Which data-parallel copy this rank belongs to (the scene stream it reads)."""
        return self.topology.get_data_parallel_rank()

    @property
    def data_size(self) -> int:
        """Data-parallel copies (``world / spatial``)."""
        return self.topology.data

    def band(self, height: int) -> tuple[int, int]:
        """This rank's rows ``(start, stop)`` of a scene of ``height`` rows."""
        from lrss_ds.parallel import band_bounds

        return band_bounds(height, self.size, self.pad_multiple)[self.group.rank]

    def samples(self, store: str | Path, split: str | None) -> Any:
        """A ``BandSamples`` of ``split``: whole scenes, this rank's band of each (windowed reads)."""
        from lrss_ds.data.band_samples import BandSamples

        return BandSamples(store, split, self.band)

    def loss(self, loss_fn: Any) -> Any:
        """``loss_fn`` as a ``SpatialLoss``: this band's share over the scene's valid-pixel count."""
        from lrss_ds.parallel import SpatialLoss

        return SpatialLoss(loss_fn, self.group)

    def scene_loss(self, share: float) -> float:
        """The scene's loss: the sum of the group's shares (a collective over the spatial group)."""
        total = comm.all_reduce(torch.tensor([share], dtype=torch.float64), group=self.topology.spatial_group)
        return float(total[0])

    def describe(self) -> str:
        """One line for the log."""
        return (
            f"spatial parallelism: {self.size} ranks per scene x {self.data_size} data-parallel cop"
            f"{'y' if self.data_size == 1 else 'ies'}; this rank holds band {self.group.rank} "
            f"(band heights multiples of {self.pad_multiple})"
        )


def start_spatial(
    config: ExperimentConfig, model: Any, ds_config: dict[str, Any], scenes: Sequence[tuple[str, int]]
) -> SpatialRun | None:
    """Build the spatial groups and turn ``model`` into its spatial version (in place).

    Call on every rank at the same point, before ``deepspeed.initialize`` (new process groups
    are collective, and the memory layer must find the spatial layers). ``ds_config`` gets
    ``sequence_parallel_size``, which DeepSpeed's batch-size arithmetic needs.

    Args:
        config: the experiment (``parallel.spatial``).
        model: the built network, on the host.
        ds_config: the DeepSpeed config (changed in place).
        scenes: ``(scene, height)`` of every scene the run will cut.

    Returns:
        The :class:`SpatialRun`, or None with ``parallel.spatial: 1``.

    Raises:
        ConfigError: (naming ``parallel.spatial``) the world is not a multiple of it, a scene is
            too short for that many bands, the DeepSpeed JSON asks for ZeRO-3 or another
            ``sequence_parallel_size``, or the model has no spatial version.
    """
    spatial = config.parallel.spatial
    if spatial == 1:
        return None
    from lrss_ds.parallel import SpatialGroup, band_bounds, spatialize

    key = config.where("parallel.spatial")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % spatial:
        raise ConfigError(key, f"{spatial} does not divide the {world} ranks of the job (spatial x data = world)")
    if ds_config.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise ConfigError(key, ZERO3_REFUSAL)
    given = ds_config.get("sequence_parallel_size", spatial)
    if given != spatial:
        raise ConfigError(key, f"differs from the DeepSpeed JSON's sequence_parallel_size {given}; remove that key")
    multiple = int(model.pad_multiple)
    for scene, height in scenes:
        try:
            band_bounds(height, spatial, multiple)
        except ValueError as error:
            raise ConfigError(key, f"scene {scene}: {error}") from None
    ds_config["sequence_parallel_size"] = spatial
    topology = SpatialTopology(spatial)
    group = SpatialGroup(comm, dist.get_rank(topology.spatial_group), spatial, topology.spatial_group)
    spatialize(model, group)
    return SpatialRun(topology=topology, group=group, pad_multiple=multiple)
