"""The process groups of spatial × data parallelism, in the form DeepSpeed takes them (its ``mpu``).

DeepSpeed's sequence parallelism (Ulysses) has the arrangement spatial parallelism needs: the
ranks of a sequence group hold parts of one sample and identical parameters, and ZeRO reduces
gradients over the sequence-data-parallel group (every rank), dividing by the data-parallel size
only (``dp_world_size / sequence_parallel_size`` in ``stage_1_and_2.py``). So each parameter's
gradient becomes the sum of its band shares, averaged over the data-parallel copies, and ZeRO
partitioning and CPU offload work as they do without it. ``deepspeed.initialize(mpu=...)``
takes the groups from here; the DeepSpeed JSON then carries ``sequence_parallel_size`` for its
batch-size arithmetic (and no ``data_parallel_size``, which would make DeepSpeed build a device
mesh whose sequence-data group is the data group alone, so band gradients would not be summed).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from lrss_ds.errors import ConfigError


class SpatialTopology:
    """Spatial groups of ``spatial`` consecutive ranks; data groups of the ranks at one band index.

    Every rank must construct it at the same point (``torch.distributed.new_group`` is collective).

    Args:
        spatial: ranks per scene (``parallel.spatial``).

    Raises:
        ConfigError: the world is not a multiple of ``spatial``.
    """

    def __init__(self, spatial: int) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if spatial < 1 or world % spatial:
            raise ConfigError("parallel.spatial", f"{spatial} does not divide the {world} ranks (spatial x data = world)")
        self.spatial, self.data = spatial, world // spatial
        self.spatial_group: Any = None
        self.data_group: Any = None
        for copy in range(self.data):
            group = dist.new_group(list(range(copy * spatial, (copy + 1) * spatial)))
            if copy == rank // spatial:
                self.spatial_group = group
        for band in range(spatial):
            group = dist.new_group(list(range(band, world, spatial)))
            if band == rank % spatial:
                self.data_group = group
        self.all_group = dist.new_group(list(range(world)))

    # DeepSpeed asks ``hasattr(mpu, "initialize_sequence_parallel")`` to tell a sequence-parallel mpu
    def initialize_sequence_parallel(self) -> None:
        """The groups are built in ``__init__``; DeepSpeed only checks that this exists."""

    def get_sequence_parallel_group(self) -> Any:
        return self.spatial_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.spatial

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(self.spatial_group)

    def get_sequence_data_parallel_group(self) -> Any:
        return self.all_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.spatial * self.data

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self.all_group)

    def get_data_parallel_group(self) -> Any:
        return self.data_group

    def get_data_parallel_world_size(self) -> int:
        return self.data

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self.data_group)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_group(self) -> Any:
        return None
