"""Windows of a raw image at another scale: cut, masked and resampled inside a backbone's stem.

MagNet looks at the image through square windows of several sizes, each resampled to one
patch size; FCtL surrounds every patch with larger context windows centred on it. Both need
the same three steps, kept here so neither repeats them:

* :func:`cut_window` cuts a window (which may reach beyond the image on any side) out of the
  raw input, zero-filled outside, and says which part is image;
* :func:`window_mask` turns those parts into a per-pixel mask;
* :func:`window_transform` builds the ``input_transform`` a backbone runs first, inside its
  stem segment (so raw integers stay raw until inside the first checkpointed segment):
  normalise, zero what lies outside the image (0 = the band mean), resample to the patch size.

Resampling is bilinear with antialiasing (``F.interpolate(..., antialias=True)``), which is
what PIL's bilinear resize of the papers' code does when it shrinks an image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Window = tuple[int, int, int, int]
"""``(r0, c0, h, w)`` in full-resolution pixels of the (padded) image; may reach outside it."""

Box = tuple[int, int, int, int]
"""``(top, left, bottom, right)``: the part of a window that is image, in window pixels."""


def cut_window(x: Tensor, window: Window) -> tuple[Tensor, Box]:
    """Cut one window out of a raw image, zero-filling whatever lies outside the image.

    Args:
        x: ``(C, H, W)`` raw bands (any dtype).
        window: ``(r0, c0, h, w)``; ``r0``/``c0`` may be negative and the window may end
            beyond ``H``/``W``.

    Returns:
        ``((C, h, w) raw window, (top, left, bottom, right))``: rows ``top:bottom`` and
        columns ``left:right`` of the window are image (an empty box if none is).
    """
    _, height, width = x.shape
    r0, c0, h, w = window
    top, left = min(h, max(0, -r0)), min(w, max(0, -c0))
    bottom, right = max(top, min(h, height - r0)), max(left, min(w, width - c0))
    part = x[:, r0 + top : r0 + bottom, c0 + left : c0 + right]
    if (top, left, bottom, right) != (0, 0, h, w):
        part = F.pad(part, (left, w - right, top, h - bottom))
    return part, (top, left, bottom, right)


def window_mask(boxes: Sequence[Box], size: tuple[int, int], device: torch.device) -> Tensor | None:
    """Which pixels of each window are image (True) rather than outside it.

    Args:
        boxes: per window, its image part from :func:`cut_window`.
        size: ``(h, w)`` of the windows.
        device: where to build the mask.

    Returns:
        ``(N, 1, h, w)`` bool, or ``None`` when every window is wholly image.
    """
    if all(tuple(b) == (0, 0, size[0], size[1]) for b in boxes):
        return None
    keep = torch.zeros(len(boxes), 1, *size, dtype=torch.bool, device=device)
    for i, (top, left, bottom, right) in enumerate(boxes):
        keep[i, :, top:bottom, left:right] = True
    return keep


def window_transform(
    normalizer: Callable[[Tensor], Tensor], keep: Tensor | None, size: tuple[int, int]
) -> Callable[[Tensor], Tensor]:
    """The ``input_transform`` that turns a batch of raw windows into backbone input.

    Args:
        normalizer: the model's :class:`~lrss_ds.models.base.InputNormalizer`.
        keep: ``(N, 1, h, w)`` image mask of the windows, or ``None`` (all image).
        size: ``(oh, ow)`` the backbone sees.

    Returns:
        ``fn((N, C, h, w) raw) -> (N, C, oh, ow)`` float32: normalised, 0 outside the image,
        resampled (bilinear, antialiased) when ``(h, w) != size``.
    """

    def transform(raw: Tensor) -> Tensor:
        t = normalizer(raw)
        if keep is not None:
            t = t * keep
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        return t

    return transform


def cut_windows(x: Tensor, jobs: Sequence[tuple[int, Window]]) -> tuple[Tensor, Tensor | None]:
    """Cut equal-sized windows of several images into one raw batch with its image mask.

    Args:
        x: ``(B, C, H, W)`` raw bands.
        jobs: ``(image index, window)`` per window; all windows have the same ``h, w``.

    Returns:
        ``((N, C, h, w) raw windows, (N, 1, h, w) image mask or None)``.
    """
    cuts = [cut_window(x[b], window) for b, window in jobs]
    size = (jobs[0][1][2], jobs[0][1][3])
    return torch.stack([c for c, _ in cuts]), window_mask([box for _, box in cuts], size, x.device)


def fit_longer_side(size: tuple[int, int], longest: int, multiple: int) -> tuple[int, int]:
    """Scale ``size`` so its longer side is at most ``longest``, sides rounded to ``multiple``.

    Images already smaller are not enlarged (the scale is capped at 1).

    Args:
        size: ``(H, W)``.
        longest: the longer side after scaling.
        multiple: every side is a positive multiple of this.

    Returns:
        ``(h, w)``.
    """
    scale = min(1.0, longest / max(size))
    height, width = (max(multiple, round(s * scale / multiple) * multiple) for s in size)
    return height, width

