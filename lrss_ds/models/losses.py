"""Segmentation losses: BAE-weighted cross-entropy (EHSNet), focal (GLSNet), plain CE, ISDNet's and STDC's.

Every loss takes the train-mode output dict of a model (logits at the network stride, a
list of auxiliary logits, ``input_size`` and ``padded_size``) and the label mask at the
input size, upsamples each map with :func:`lrss_ds.models.base.upsample_logits`, and
returns ``main + sum_i aux_weight_i * aux_i``. Each term is a weighted mean over pixels,
``sum(w * l) / sum(w)``, with ``w = 0`` on ignored pixels, ``w = 1`` elsewhere, and for
the EHSNet loss ``w = 1 + 1[sobel(M) != 0]`` (Eq. 6). Normalising by ``sum(w)`` rather
than by the count of valid pixels (mmseg's convention) keeps the loss scale independent
of how much of the scene is boundary; the boundary pixels still count twice relative to
the interior.

With ``band_rows`` the upsampling and the loss run in horizontal bands of that many
output rows, each under non-reentrant ``torch.utils.checkpoint``, so the full-resolution
logits (``K * H * W`` floats, 4.7 GB for 24 classes on a 6800x7200 scene) never exist at
once; the result equals the unbanded loss up to float summation order.

ISDNet's super-resolution and affinity terms and STDC's detail loss
(:mod:`lrss_ds.models.aux_losses`) are added, with their weights, when the model gives the
outputs they read; they are computed whole, also with ``band_rows``.

The loss is computed in float32, or in float64 when the logits are float64 (so that
banded and unbanded can be compared to ~1e-12, see ``tests/models/test_models_losses.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lrss_ds.errors import ConfigError
from lrss_ds.models import aux_losses
from lrss_ds.models.base import upsample_logits

PIXEL_LOSSES: tuple[str, ...] = ("ce", "focal")


# --- BAE: boundary weights from the mask ---------------------------------------------------


def sobel_kernels(kernel_size: int = 5) -> Tensor:
    """The ``(2, 1, K, K)`` Sobel kernels (d/dx, d/dy) of OpenCV's ``getDerivKernels``.

    The derivative is ``binomial(K - 3) * [-1, 0, 1]`` and the smoothing ``binomial(K - 1)``
    (for K = 5: ``[-1, -2, 0, 2, 1]`` and ``[1, 4, 6, 4, 1]``). Integer-valued, so the
    Sobel response of an integer mask is exact in float32.

    Raises:
        ValueError: ``kernel_size`` not odd or below 3.
    """
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"sobel_kernels: kernel_size must be odd and >= 3, got {kernel_size}")
    smooth = torch.tensor([float(math.comb(kernel_size - 1, i)) for i in range(kernel_size)])
    base = [float(math.comb(kernel_size - 3, i)) for i in range(kernel_size - 2)]
    padded_base = [0.0, 0.0] + base + [0.0, 0.0]
    # deriv[j] = sum_i base[i] * [-1, 0, 1][j - i]
    deriv = torch.tensor([padded_base[j] - padded_base[j + 2] for j in range(kernel_size)])
    dx = smooth.view(-1, 1) * deriv.view(1, -1)
    return torch.stack([dx, dx.t()]).unsqueeze(1)


def boundary_mask(target: Tensor, ignore_index: int, kernel_size: int = 5) -> Tensor:
    """Pixels where the Sobel operator on the label mask is non-zero: ``1[sobel(M) != 0]``.

    The mask is treated as an image of class indices. Ignored pixels and pixels outside
    the image do not take part: in each pixel's window they are replaced by the pixel's own
    class, so they neither create a boundary around an ignored region nor around the scene
    edge (an ignored area is not evidence of a class change). Computed as
    ``conv(k, v * M) - M * conv(k, v)`` with ``v`` the validity mask and zero padding, which
    is that substitution because the derivative kernels sum to zero. Ignored pixels are
    never boundary.

    Args:
        target: ``(B, H, W)`` integer labels (uint8 or long).
        ignore_index: the label of pixels to ignore.
        kernel_size: Sobel kernel size (paper: 5).

    Returns:
        ``(B, H, W)`` bool.
    """
    valid = (target != ignore_index).float()
    labels = target.float() * valid  # ignored pixels hold 0 here and are masked by ``valid``
    kernels = sobel_kernels(kernel_size).to(target.device)  # (2, 1, K, K)
    stacked = torch.stack([labels, valid], dim=1)  # (B, 2, H, W)
    responses = F.conv2d(stacked, kernels.repeat(2, 1, 1, 1), padding=kernel_size // 2, groups=2)
    grad_x = responses[:, 0] - labels * responses[:, 2]
    grad_y = responses[:, 1] - labels * responses[:, 3]
    # The responses are integers computed exactly; 0.5 separates zero from non-zero.
    return ((grad_x.abs() > 0.5) | (grad_y.abs() > 0.5)) & (valid > 0)


def bae_weights(target: Tensor, ignore_index: int, kernel_size: int = 5, boundary_weight: float = 1.0) -> Tensor:
    """The BAE pixel weights ``W = 1 + boundary_weight * 1[sobel(M) != 0]`` and 0 on ignored pixels.

    Args:
        target: ``(B, H, W)`` integer labels.
        ignore_index: the label of pixels to ignore.
        kernel_size: Sobel kernel size.
        boundary_weight: extra weight of boundary pixels (paper: 1).

    Returns:
        ``(B, H, W)`` float32.
    """
    valid = (target != ignore_index).float()
    return valid + boundary_weight * boundary_mask(target, ignore_index, kernel_size).float()


# --- per-pixel losses ----------------------------------------------------------------------


loss_dtype = aux_losses.loss_dtype
"""The dtype a loss is computed in: float32, or float64 for float64 logits."""


def pixel_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy per pixel, 0 on ignored pixels: ``(B, K, H, W), (B, H, W) -> (B, H, W)``."""
    return F.cross_entropy(logits.to(loss_dtype(logits.dtype)), target.long(), ignore_index=ignore_index, reduction="none")


def pixel_focal(logits: Tensor, target: Tensor, ignore_index: int, gamma: float, alpha: float) -> Tensor:
    """Focal loss per pixel ``-alpha (1 - p_t)^gamma log p_t``, 0 on ignored pixels.

    ``1 - p_t`` is computed as ``-expm1(log p_t)`` so confident pixels keep precision at
    ``gamma = 6``.

    Args:
        logits: ``(B, K, H, W)``.
        target: ``(B, H, W)`` integer labels.
        ignore_index: the label of pixels to ignore.
        gamma: focusing parameter (GLSNet: 6).
        alpha: the loss weight (GLSNet: 1).

    Returns:
        ``(B, H, W)`` in :func:`loss_dtype` of the logits.
    """
    target = target.long()
    valid = target != ignore_index
    log_p = F.log_softmax(logits.to(loss_dtype(logits.dtype)), dim=1)
    log_pt = log_p.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    loss = -alpha * (-torch.expm1(log_pt)).pow(gamma) * log_pt
    return torch.where(valid, loss, 0.0)


# --- band-wise upsampling ------------------------------------------------------------------


def _linear_source(
    out_start: int, out_stop: int, in_size: int, out_size: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights of bilinear (align_corners=False) resizing along one axis.

    Mirrors PyTorch's CPU kernel: ``src = (dst + 0.5) * in / out - 0.5`` in the kernel's
    "opmath" type (float64 for float64 tensors, float32 otherwise), clamped at 0;
    ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``l1 = src - i0``, ``l0 = 1 - l1``.

    Args:
        out_start: first output index.
        out_stop: one past the last output index.
        in_size: input length.
        out_size: output length.
        device: where the indices live.
        dtype: the dtype of the tensor being resized.

    Returns:
        ``(i0, i1, l1)`` for output indices ``out_start .. out_stop - 1``.
    """
    opmath = loss_dtype(dtype)
    scale = torch.tensor(in_size, dtype=opmath) / out_size
    dst = torch.arange(out_start, out_stop, dtype=opmath, device=device)
    src = ((dst + 0.5) * scale.to(device) - 0.5).clamp_min(0.0)
    i0 = src.long()
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, src - i0.to(opmath)


def _source_span(out_start: int, out_stop: int, in_size: int, out_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(i0[0], i1[-1] + 1)`` of :func:`_linear_source`, computed on the host.

    The same float operations in the same precision (numpy's float32/float64 round like the
    kernels), so the span equals the one read from the device tensors, without making the host
    wait for the device to compute them.
    """
    opmath = np.float64 if loss_dtype(dtype) == torch.float64 else np.float32
    scale = opmath(in_size) / opmath(out_size)
    half = opmath(0.5)

    def source(dst: int) -> int:
        return int(max((opmath(dst) + half) * scale - half, opmath(0.0)))

    return source(out_start), min(source(out_stop - 1) + 1, in_size - 1) + 1


def upsample_rows(logits: Tensor, padded: tuple[int, int], input_size: tuple[int, int], row_start: int, row_stop: int) -> Tensor:
    """Rows ``row_start:row_stop`` of ``upsample_logits(logits, padded, input_size)``.

    Reads only the low-resolution rows those output rows interpolate from; which rows those are
    is worked out on the host (:func:`_source_span`), so a band costs no device synchronisation.

    Args:
        logits: ``(B, K, h, w)``.
        padded: ``(Hp, Wp)``.
        input_size: ``(H, W)``.
        row_start: first output row (``0 <= row_start < row_stop <= H``).
        row_stop: one past the last output row.

    Returns:
        ``(B, K, row_stop - row_start, W)``.
    """
    height, width = logits.shape[-2:]
    out_h, out_w = padded
    if height == out_h:
        rows = logits[:, :, row_start:row_stop]
    else:
        i0, i1, l1 = _linear_source(row_start, row_stop, height, out_h, logits.device, logits.dtype)
        first, last = _source_span(row_start, row_stop, height, out_h, logits.dtype)
        rows = logits[:, :, first:last]
        lam1 = l1.to(rows.dtype).view(1, 1, -1, 1)
        # Width first, then height: the order PyTorch's bilinear kernel multiplies in.
        rows = _upsample_width(rows, out_w)
        rows = rows.index_select(2, i0 - first) * (1.0 - lam1) + rows.index_select(2, i1 - first) * lam1
        return rows[..., : input_size[1]]
    return _upsample_width(rows, out_w)[..., : input_size[1]]


def _upsample_width(rows: Tensor, out_w: int) -> Tensor:
    """Linear (align_corners=False) resize of the last axis of ``(B, K, r, w)`` to ``out_w``."""
    batch, classes, nrows, width = rows.shape
    if width == out_w:
        return rows
    flat = rows.reshape(batch, classes * nrows, width)
    return F.interpolate(flat, size=out_w, mode="linear", align_corners=False).view(batch, classes, nrows, out_w)


# --- the loss ------------------------------------------------------------------------------


@dataclass
class LossConfig:
    """What a segmentation loss computes (defaults: plain CE).

    Attributes:
        pixel_loss: ``"ce"`` or ``"focal"``.
        aux_weight: weight of each auxiliary term, one number for all or one per aux map.
        boundary_kernel: Sobel kernel size of the BAE weights; None for no boundary weights.
        boundary_weight: extra weight on boundary pixels (``W = 1 + boundary_weight * 1[...]``).
        gamma: focal focusing parameter.
        alpha: focal loss weight.
        band_rows: compute in row bands of this many output rows (None: all at once).
        sr_weight: weight of ISDNet's super-resolution term (needs the model's ``sr`` output).
        affinity_weight: weight of ISDNet's feature-affinity term (needs ``affinity``).
        affinity_positions: the most positions an affinity matrix is computed over.
        detail_weight: weight of STDC's detail loss (needs ``detail``).
    """

    pixel_loss: str = "ce"
    aux_weight: float | Sequence[float] = 0.4
    boundary_kernel: int | None = None
    boundary_weight: float = 1.0
    gamma: float = 6.0
    alpha: float = 1.0
    band_rows: int | None = None
    sr_weight: float = 0.0
    affinity_weight: float = 0.0
    affinity_positions: int = 4096
    detail_weight: float = 0.0


class SegmentationLoss(nn.Module):
    """``main + sum_i aux_weight_i * aux_i`` of a per-pixel loss, each a weighted mean.

    Args:
        config: what to compute.
        num_classes: ``K``.
        ignore_index: the label of pixels that do not count.

    Raises:
        ConfigError: unknown pixel loss, or ``band_rows`` / ``boundary_kernel`` invalid.
    """

    def __init__(self, config: LossConfig, num_classes: int, ignore_index: int) -> None:
        super().__init__()
        if config.pixel_loss not in PIXEL_LOSSES:
            raise ConfigError("loss.pixel_loss", f"unknown {config.pixel_loss!r}; choose from {PIXEL_LOSSES}")
        if config.band_rows is not None and config.band_rows < 1:
            raise ConfigError("loss.band_rows", f"must be a positive number of rows, got {config.band_rows}")
        if config.boundary_kernel is not None and (config.boundary_kernel < 3 or config.boundary_kernel % 2 == 0):
            raise ConfigError("loss.boundary_kernel", f"must be odd and >= 3, got {config.boundary_kernel}")
        self.config = config
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def extra_repr(self) -> str:
        return f"{self.config}, num_classes={self.num_classes}, ignore_index={self.ignore_index}"

    def pixel_weights(self, target: Tensor) -> Tensor:
        """``(B, H, W)`` float32 weights: 0 ignored, 1 valid, plus the BAE boundary term."""
        if self.config.boundary_kernel is None:
            return (target != self.ignore_index).float()
        return bae_weights(target, self.ignore_index, self.config.boundary_kernel, self.config.boundary_weight)

    def pixel_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """``(B, K, H, W), (B, H, W) -> (B, H, W)`` per-pixel loss, 0 on ignored pixels."""
        if self.config.pixel_loss == "focal":
            return pixel_focal(logits, target, self.ignore_index, self.config.gamma, self.config.alpha)
        return pixel_cross_entropy(logits, target, self.ignore_index)

    def forward(self, outputs: dict[str, Any] | Tensor, target: Tensor) -> Tensor:
        """The scalar loss.

        Args:
            outputs: a model's train-mode dict (``logits (B, K, h, w)``, ``aux`` list,
                ``input_size (H, W)``, ``padded_size (Hp, Wp)``), or a bare ``(B, K, H, W)``
                logits tensor already at the target size.
            target: ``(B, H, W)`` uint8 or long labels.

        Returns:
            Scalar tensor in :func:`loss_dtype` of the logits (float32, or float64).

        Raises:
            ValueError: target size differs from ``input_size``, labels out of range, or
                the number of aux weights does not match the aux maps.
        """
        maps, weights, padded, input_size = self._unpack(outputs)
        if tuple(target.shape[-2:]) != tuple(input_size) or target.dim() != 3:
            raise ValueError(f"loss: target {tuple(target.shape)} does not match the input size {tuple(input_size)}")
        bad = self._out_of_range(target)
        if bool(bad.any()):
            raise ValueError(
                f"loss: labels {target[bad].unique().tolist()[:5]} are outside 0..{self.num_classes - 1} "
                f"(num_classes {self.num_classes}) and not the ignore index {self.ignore_index}"
            )
        if self.config.band_rows is None:
            loss = self._whole(maps, weights, padded, input_size, target)
        else:
            loss = self._banded(maps, weights, padded, input_size, target)
        if isinstance(outputs, dict):
            loss = loss + self._auxiliary_terms(outputs, target, padded, input_size)
        return loss

    def _auxiliary_terms(self, outputs: dict[str, Any], target: Tensor, padded: tuple[int, int],
                         input_size: tuple[int, int]) -> Tensor | float:
        """The weighted terms of :mod:`lrss_ds.models.aux_losses` whose weight is not 0.

        Raises:
            ValueError: a term has a weight but the model gave no output for it.
        """
        config = self.config
        terms: list[tuple[float, str, Callable[[Any], Tensor]]] = [
            (config.sr_weight, "sr", lambda sr: aux_losses.super_resolution_loss(sr[0], sr[1], input_size)),
            (config.affinity_weight, "affinity", lambda pair: aux_losses.affinity_loss(
                pair[0], pair[1], input_size, padded, config.affinity_positions)),
            (config.detail_weight, "detail", lambda detail: aux_losses.detail_loss(
                detail, target, self.ignore_index, padded, input_size)),
        ]
        total: Tensor | float = 0.0
        for weight, key, term in terms:
            if weight == 0.0:
                continue
            if outputs.get(key) is None:
                raise ValueError(f"loss: {key}_weight is {weight} but the model gives no {key!r} output "
                                 "(use the loss preset of the model, or set the weight to 0)")
            total = total + weight * term(outputs[key])
        return total

    def _out_of_range(self, target: Tensor) -> Tensor:
        """``(B, H, W)`` bool: labels that are neither a class nor the ignore index.

        Compared in the target's own dtype: a ``.long()`` copy of a whole-scene uint8 mask
        would cost 8 bytes per pixel.
        """
        if target.dtype == torch.uint8 and self.num_classes > 255:
            too_big = torch.zeros_like(target, dtype=torch.bool)
        else:
            too_big = target >= self.num_classes
        if target.is_signed() or target.is_floating_point():
            too_big = too_big | (target < 0)
        return too_big & (target != self.ignore_index)

    def _unpack(self, outputs: dict[str, Any] | Tensor) -> tuple[list[Tensor], list[float], tuple[int, int], tuple[int, int]]:
        """The maps, their weights (main first, 1.0), padded size and input size."""
        if isinstance(outputs, Tensor):
            size = tuple(outputs.shape[-2:])
            return [outputs], [1.0], size, size  # type: ignore[return-value]
        aux = list(outputs.get("aux") or [])
        aux_weight = self.config.aux_weight
        aux_weights = [float(aux_weight)] * len(aux) if isinstance(aux_weight, (int, float)) else list(aux_weight)
        if len(aux_weights) != len(aux):
            raise ValueError(f"loss: {len(aux_weights)} aux weights for {len(aux)} aux outputs")
        maps = [outputs["logits"]] + aux
        keep = [(m, w) for m, w in zip(maps, [1.0] + aux_weights) if w != 0.0]
        return [m for m, _ in keep], [w for _, w in keep], tuple(outputs["padded_size"]), tuple(outputs["input_size"])

    def _whole(self, maps: list[Tensor], weights: list[float], padded: tuple[int, int], input_size: tuple[int, int], target: Tensor) -> Tensor:
        """All at once: each map upsampled to the full input size."""
        pixel_w = self.pixel_weights(target)
        # Integer-valued: summed in float64 it is exact (float32 is not beyond 2^24 pixels),
        # so banded and unbanded divide by the very same number.
        dtype = loss_dtype(maps[0].dtype)
        total = pixel_w.sum(dtype=torch.float64).clamp_min(1.0).to(dtype)
        loss = maps[0].new_zeros((), dtype=dtype)
        for logits, weight in zip(maps, weights):
            full = upsample_logits(logits, padded, input_size)
            loss = loss + weight * (pixel_w * self.pixel_loss(full, target)).sum()
        return loss / total

    def _banded(self, maps: list[Tensor], weights: list[float], padded: tuple[int, int], input_size: tuple[int, int], target: Tensor) -> Tensor:
        """Row band by row band, each recomputed in backward instead of stored."""
        height = input_size[0]
        step = int(self.config.band_rows)  # type: ignore[arg-type]
        # The Sobel window reaches this many rows above and below a band.
        halo = (self.config.boundary_kernel // 2) if self.config.boundary_kernel is not None else 0
        bands = [(start, min(start + step, height)) for start in range(0, height, step)]

        def band_target(start: int, stop: int) -> tuple[Tensor, int]:
            lo, hi = max(0, start - halo), min(height, stop + halo)
            return target[:, lo:hi], start - lo

        with torch.no_grad():
            total = sum(self._band_weights(*band_target(s, e), e - s).sum(dtype=torch.float64) for s, e in bands)
        dtype = loss_dtype(maps[0].dtype)
        total = torch.as_tensor(total, dtype=torch.float64).clamp_min(1.0).to(dtype)

        def band_loss(start: int, stop: int, target_halo: Tensor, offset: int, *band_maps: Tensor) -> Tensor:
            pixel_w = self._band_weights(target_halo, offset, stop - start)
            band_labels = target_halo[:, offset : offset + stop - start]
            out = band_maps[0].new_zeros((), dtype=dtype)
            for logits, weight in zip(band_maps, weights):
                rows = upsample_rows(logits, padded, input_size, start, stop)
                out = out + weight * (pixel_w * self.pixel_loss(rows, band_labels)).sum()
            return out

        loss = maps[0].new_zeros((), dtype=dtype)
        for start, stop in bands:
            target_halo, offset = band_target(start, stop)
            loss = loss + checkpoint(band_loss, start, stop, target_halo, offset, *maps, use_reentrant=False)
        return loss / total

    def _band_weights(self, target_halo: Tensor, offset: int, rows: int) -> Tensor:
        """Pixel weights of ``rows`` rows starting at ``offset`` of a band with its halo."""
        return self.pixel_weights(target_halo)[:, offset : offset + rows]


# --- construction by name ------------------------------------------------------------------

LOSS_PRESETS: dict[str, Callable[[], LossConfig]] = {
    # EHSNet §3.4-3.5: CE weighted by the BAE boundary weights (Sobel 5), main + 0.4 aux.
    "ehsnet": lambda: LossConfig(pixel_loss="ce", aux_weight=0.4, boundary_kernel=5),
    # GLSNet §4.2: focal loss, weight 1.0, gamma 6; two aux losses at 0.15.
    "focal": lambda: LossConfig(pixel_loss="focal", aux_weight=0.15, gamma=6.0, alpha=1.0),
    "ce": lambda: LossConfig(pixel_loss="ce", aux_weight=0.4),
    # ISDNet (its released configuration): CE on the main logits and on the aux maps [deep
    # logits 1.0, fusion-16 1.0, fusion-8 1.0, FCN on layer 3 0.4], SR MSE 0.1, affinity L1 1.0.
    "isdnet": lambda: LossConfig(pixel_loss="ce", aux_weight=(1.0, 1.0, 1.0, 0.4), sr_weight=0.1, affinity_weight=1.0),
    # STDC-Seg: CE on the main and the two context-path maps (1.0 each), detail BCE + Dice 1.0.
    "stdc": lambda: LossConfig(pixel_loss="ce", aux_weight=(1.0, 1.0), detail_weight=1.0),
}


def build_loss(name: str, num_classes: int, ignore_index: int, **opts: Any) -> SegmentationLoss:
    """The loss called ``name`` (``ehsnet``, ``focal``, ``ce``, ``isdnet`` or ``stdc``) with options overridden.

    Args:
        name: the preset.
        num_classes: ``K``.
        ignore_index: the label of pixels that do not count.
        **opts: any :class:`LossConfig` field (``aux_weight``, ``band_rows``, ``gamma``,
            ``alpha``, ``boundary_kernel``, ``boundary_weight``, ``pixel_loss``, ``sr_weight``,
            ``affinity_weight``, ``affinity_positions``, ``detail_weight``).

    Returns:
        A callable ``loss_fn(outputs, target) -> scalar``.

    Raises:
        ConfigError: unknown name or option.
    """
    if name not in LOSS_PRESETS:
        raise ConfigError("loss", f"unknown loss {name!r}; choose from {sorted(LOSS_PRESETS)}")
    config = LOSS_PRESETS[name]()
    known = {f.name for f in fields(LossConfig)}
    for key, value in opts.items():
        if key not in known:
            raise ConfigError(f"loss.{key}", f"unknown option for loss {name!r}; known: {sorted(known)}")
        setattr(config, key, value)
    return SegmentationLoss(config, num_classes, ignore_index)
