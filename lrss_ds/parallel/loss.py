"""The loss of a banded scene: each rank's share of the one-rank loss, over the scene's valid-pixel count."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrss_ds.models.base import crop_to
from lrss_ds.models.losses import SegmentationLoss, bae_weights
from lrss_ds.parallel.group import SpatialGroup
from lrss_ds.parallel.halo import SpatialResize, halo_rows


class SpatialLoss(nn.Module):
    """A :class:`SegmentationLoss` computed on one band, its denominator the whole scene's.

    The band's logits are upsampled with row halos, BAE boundary weights read label halos
    (``boundary_kernel // 2`` rows), and the weighted sum is divided by the all-reduced sum of
    the scene's pixel weights, so the group's sum of the returned values is the one-rank loss
    and so is the sum of their gradients. ``band_rows`` (banded loss within a rank) is not used.

    Args:
        loss: the one-rank loss.
        group: the spatial group.
    """

    def __init__(self, loss: SegmentationLoss, group: SpatialGroup) -> None:
        super().__init__()
        self.loss = loss
        self.spatial = group
        self.resize = SpatialResize(group)

    def pixel_weights(self, target: Tensor, padded_rows: int) -> Tensor:
        """``(B, h, W)`` weights of this band's pixels, boundary terms from the neighbours' labels.

        The bottom band's labels are padded to ``padded_rows`` with the ignore index, which the
        boundary mask treats as it treats rows outside the scene, so the band tables of the
        exchange are the network's.
        """
        kernel = self.loss.config.boundary_kernel
        if kernel is None:
            return self.loss.pixel_weights(target)
        halo = kernel // 2
        labels = F.pad(target, (0, 0, 0, padded_rows - target.shape[1]), value=self.loss.ignore_index)
        block, missing_top, _ = halo_rows(labels.unsqueeze(1), self.spatial, halo, halo)
        weights = bae_weights(block[:, 0], self.loss.ignore_index, kernel, self.loss.config.boundary_weight)
        first = halo - missing_top
        return weights[:, first : first + target.shape[1]]

    def forward(self, outputs: dict[str, Any], target: Tensor) -> Tensor:
        """This band's share of the scene loss (a collective: every rank of the group calls it).

        Args:
            outputs: the spatial model's train-mode dict for the band.
            target: ``(B, h, W)`` the band's labels.

        Returns:
            scalar; the sum over the group is the scene's loss.

        Raises:
            ValueError: target size differs from the band's input size, or labels out of range.
        """
        maps, weights, padded, input_size = self.loss._unpack(outputs)
        if tuple(target.shape[-2:]) != tuple(input_size) or target.dim() != 3:
            raise ValueError(f"loss: target {tuple(target.shape)} does not match the band's input size {tuple(input_size)}")
        bad = self.loss._out_of_range(target)
        if bool(bad.any()):
            raise ValueError(f"loss: labels {target[bad].unique().tolist()[:5]} are outside 0..{self.loss.num_classes - 1}")
        pixel_w = self.pixel_weights(target, padded[0])
        dtype = maps[0].dtype if maps[0].dtype == torch.float64 else torch.float32
        total = self.spatial.comm.all_reduce(pixel_w.sum(dtype=torch.float64).reshape(1), group=self.spatial.group)
        total = total[0].clamp_min(1.0).to(dtype)
        loss = maps[0].new_zeros((), dtype=dtype)
        for logits, weight in zip(maps, weights):
            full = crop_to(self.resize(logits, padded), input_size)
            loss = loss + weight * (pixel_w * self.loss.pixel_loss(full, target)).sum()
        return loss / total
