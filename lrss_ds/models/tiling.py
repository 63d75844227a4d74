"""Cut an image into a grid of equal crops and put per-crop maps back: the tiling GLSNet and GLNet share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TILE_MULTIPLE = 32
"""Crops (and so the padded image) are multiples of the ResNet's total stride."""


@dataclass(frozen=True)
class Tiling:
    """How an ``H x W`` image is cut into a ``rows x cols`` grid of equal crops.

    Attributes:
        rows: number of crop rows.
        cols: number of crop columns.
        crop: ``(ch, cw)``, the crop size in pixels (multiples of 32).
        padded: ``(Hp, Wp) = (rows * ch, cols * cw)``.
    """

    rows: int
    cols: int
    crop: tuple[int, int]
    padded: tuple[int, int]

    def windows(self) -> list[tuple[int, int, int, int]]:
        """``(r0, c0, ch, cw)`` of every crop, row-major (the order of stitching)."""
        ch, cw = self.crop
        return [(r * ch, c * cw, ch, cw) for r in range(self.rows) for c in range(self.cols)]


def plan_tiling(size: tuple[int, int], crop_size: int, multiple: int = TILE_MULTIPLE) -> Tiling:
    """Cut an image into the fewest equal crops no larger than ``crop_size`` with little padding.

    Args:
        size: ``(H, W)`` of the input.
        crop_size: largest crop side in pixels (a multiple of ``multiple``).
        multiple: every crop side is a multiple of this.

    Returns:
        the :class:`Tiling`; per axis ``n = ceil(ceil_m(H) / crop_size)`` crops of side
        ``ceil(ceil_m(H) / n / multiple) * multiple``.
    """
    crop: list[int] = []
    counts: list[int] = []
    for length in size:
        rounded = math.ceil(length / multiple) * multiple
        n = math.ceil(rounded / crop_size)
        crop.append(math.ceil(rounded / n / multiple) * multiple)
        counts.append(n)
    return Tiling(counts[0], counts[1], (crop[0], crop[1]), (counts[0] * crop[0], counts[1] * crop[1]))


def crop_raw(x: Tensor, window: tuple[int, int, int, int]) -> tuple[Tensor, tuple[int, int]]:
    """Cut one crop out of the raw input, zero-filling what lies beyond the image.

    Args:
        x: ``(C, H, W)`` raw bands (any dtype).
        window: ``(r0, c0, ch, cw)`` in padded-image pixels.

    Returns:
        ``((C, ch, cw) crop, (valid_h, valid_w))``: the crop's top-left ``valid_h x
        valid_w`` pixels are image; the rest must become 0 after normalisation.
    """
    r0, c0, ch, cw = window
    part = x[:, r0 : r0 + ch, c0 : c0 + cw]
    valid = (int(part.shape[-2]), int(part.shape[-1]))
    if valid != (ch, cw):
        part = F.pad(part, (0, cw - valid[1], 0, ch - valid[0]))
    return part, valid


def image_mask(valid: Sequence[tuple[int, int]], crop: tuple[int, int], device: torch.device) -> Tensor | None:
    """Which pixels of each crop are image (True) rather than padding.

    Args:
        valid: per crop ``(valid_h, valid_w)`` from :func:`crop_raw`.
        crop: ``(ch, cw)``.
        device: where to build the mask.

    Returns:
        ``(N, 1, ch, cw)`` bool, or ``None`` when every crop is wholly image.
    """
    if all(tuple(v) == tuple(crop) for v in valid):
        return None
    keep = torch.ones(len(valid), 1, *crop, dtype=torch.bool, device=device)
    for i, (vh, vw) in enumerate(valid):
        keep[i, :, vh:, :] = False
        keep[i, :, :, vw:] = False
    return keep


def stitch(crops: Tensor, tiling: Tiling, batch: int) -> Tensor:
    """Put per-crop maps back on the whole-image grid.

    Args:
        crops: ``(batch * rows * cols, K, h, w)``, image-major then row-major.
        tiling: the grid they came from.
        batch: B.

    Returns:
        ``(B, K, rows * h, cols * w)``.
    """
    _, k, h, w = crops.shape
    grid = crops.reshape(batch, tiling.rows, tiling.cols, k, h, w)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, k, tiling.rows * h, tiling.cols * w)
