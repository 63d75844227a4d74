"""Auxiliary training terms beyond per-pixel classification: ISDNet's SR and affinity, STDC's detail loss.

Each reads a model's extra train-mode output (``sr``, ``affinity``, ``detail``; see
:mod:`lrss_ds.models.isdnet` and :mod:`lrss_ds.models.stdc`) and returns a scalar; the
segmentation loss (:class:`lrss_ds.models.losses.SegmentationLoss`) adds them with their
weights. Every term looks only at positions that cover the input (the padding margin a model
adds is left out), and is computed whole (not in the loss's row bands): the largest tensor is
the SR term's ``C x H x W`` image, a few bands' worth of the input itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lrss_ds.models.base import crop_to, upsample_logits


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (as :func:`lrss_ds.models.losses.loss_dtype`, which imports this module)."""
    return torch.promote_types(dtype, torch.float32)


def _valid(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Positions of a stride-``stride`` grid that cover an input of ``size``: ``ceil(H / stride)``."""
    return -(-size[0] // stride), -(-size[1] // stride)


def super_resolution_loss(prediction: Tensor, target: Tensor, input_size: tuple[int, int]) -> Tensor:
    """ISDNet's reconstruction term: MSE of the SR image, upsampled to the target, over the input's pixels.

    Args:
        prediction: ``(B, C, h, w)`` SR output (stride 2 of the padded input).
        target: ``(B, C, Hp, Wp)`` what it reconstructs (the summed Laplacian residuals).
        input_size: ``(H, W)`` without the padding margin.

    Returns:
        scalar mean squared error.
    """
    dtype = loss_dtype(prediction.dtype)
    full = upsample_logits(prediction.to(dtype), tuple(target.shape[-2:]), input_size)  # type: ignore[arg-type]
    return F.mse_loss(full, crop_to(target, input_size).to(dtype))


def affinity(features: Tensor, eps: float = 1e-6) -> Tensor:
    """Cosine similarity of every pair of positions: ``(B, C, h, w) -> (B, h*w, h*w)``."""
    flat = features.flatten(2)
    flat = flat / (flat.norm(dim=1, keepdim=True) + eps)
    return flat.transpose(1, 2) @ flat


def affinity_loss(seg_features: Tensor, sr_features: Tensor, input_size: tuple[int, int], padded: tuple[int, int],
                  max_positions: int = 4096) -> Tensor:
    """ISDNet's structural term: L1 between the affinities of the segmentation and (detached) SR features.

    The SR features (stride 2) are average-pooled onto the segmentation grid; beyond
    ``max_positions`` positions both are average-pooled further by the smallest integer factor
    that brings them under it (the ``N x N`` matrix is what costs memory).

    Args:
        seg_features: ``(B, C, h, w)`` deep features, covering the padded input.
        sr_features: ``(B, C', h2, w2)`` SR decoder features, covering the padded input.
        input_size: ``(H, W)``.
        padded: ``(Hp, Wp)``.
        max_positions: the most positions an affinity is computed over.

    Returns:
        scalar mean absolute difference.
    """
    dtype = loss_dtype(seg_features.dtype)
    seg_stride = padded[0] // seg_features.shape[-2]
    sr_stride = padded[0] // sr_features.shape[-2]
    seg_valid = _valid(input_size, seg_stride)
    seg = crop_to(seg_features.to(dtype), seg_valid)
    sr = F.adaptive_avg_pool2d(crop_to(sr_features.detach().to(dtype), _valid(input_size, sr_stride)), seg_valid)
    positions = seg_valid[0] * seg_valid[1]
    if positions > max_positions:
        factor = math.ceil(math.sqrt(positions / max_positions))
        while math.ceil(seg_valid[0] / factor) * math.ceil(seg_valid[1] / factor) > max_positions:
            factor += 1
        seg = F.avg_pool2d(seg, factor, ceil_mode=True)
        sr = F.avg_pool2d(sr, factor, ceil_mode=True)
    return F.l1_loss(affinity(seg), affinity(sr))


LAPLACIAN_3 = ((-1.0, -1.0, -1.0), (-1.0, 8.0, -1.0), (-1.0, -1.0, -1.0))


def detail_targets(target: Tensor, ignore_index: int) -> Tensor:
    """STDC's binary detail ground truth from the label mask.

    The 3x3 Laplacian of the label image (class indices) at strides 1, 2 and 4, each clamped at
    0, thresholded at 0.1 and upsampled (nearest), fused with weights 0.6, 0.3, 0.1 and
    thresholded at 0.1 (strictly above). A stride-4 boundary alone gives exactly 0.1 and does
    not pass, so the fusion reduces to "boundary at stride 1 or 2", which is how it is computed.
    Ignored pixels and the outside of the image are replaced, in every window, by the centre
    pixel's class (as in :func:`lrss_ds.models.losses.boundary_mask`), so they create no detail.

    Args:
        target: ``(B, H, W)`` integer labels.
        ignore_index: the label of pixels to ignore.

    Returns:
        ``(B, H, W)`` float32, 1 on detail pixels, 0 elsewhere (and on ignored pixels).
    """
    valid = (target != ignore_index).float().unsqueeze(1)
    labels = target.float().unsqueeze(1) * valid
    kernel = torch.tensor(LAPLACIAN_3, device=target.device).view(1, 1, 3, 3)
    height, width = target.shape[-2:]
    detail = torch.zeros_like(labels, dtype=torch.bool)
    for stride in (1, 2):
        response = F.conv2d(labels, kernel, stride=stride, padding=1)
        # conv(k, v * M) - M * conv(k, v): neighbours outside or ignored take the centre's class
        centre = labels[..., ::stride, ::stride]
        response = response - centre * F.conv2d(valid, kernel, stride=stride, padding=1)
        edge = (response.clamp_min(0.0) > 0.1).float()
        if stride > 1:
            edge = F.interpolate(edge, size=(height, width), mode="nearest")
        detail |= edge > 0.5
    return (detail & (valid > 0)).float().squeeze(1)


def detail_loss(detail_logits: Tensor, target: Tensor, ignore_index: int, padded: tuple[int, int],
                input_size: tuple[int, int]) -> Tensor:
    """STDC's detail aggregation loss: binary cross-entropy + Dice of the detail head, over valid pixels.

    Args:
        detail_logits: ``(B, 1, h, w)`` at the model's stride over the padded input.
        target: ``(B, H, W)`` labels.
        ignore_index: the label of pixels to ignore.
        padded: ``(Hp, Wp)``.
        input_size: ``(H, W)``.

    Returns:
        scalar ``bce + dice`` (Dice with smoothing 1, per sample, averaged).
    """
    dtype = loss_dtype(detail_logits.dtype)
    logits = upsample_logits(detail_logits.to(dtype), padded, input_size)[:, 0]
    truth = detail_targets(target, ignore_index).to(dtype)
    valid = (target != ignore_index).to(dtype)
    bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    bce = (bce * valid).sum() / valid.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits) * valid
    intersection = (prob * truth).flatten(1).sum(1)
    dice = 1.0 - (2.0 * intersection + 1.0) / (prob.flatten(1).sum(1) + truth.flatten(1).sum(1) + 1.0)
    return bce + dice.mean()
