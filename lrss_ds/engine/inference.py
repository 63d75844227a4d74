"""Run a model over whole scenes: one holistic forward, or blended sliding windows, row by row."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lrss_ds.data.rasters import RasterSource
from lrss_ds.errors import InputFileError, LrssError
from lrss_ds.memory.banded_inference import PIXEL_BAND_ROWS, banded_eval, row_logits
from lrss_ds.memory.fold_batchnorm import folded_batchnorm
from lrss_ds.models.large_kernel import native_bf16_cpu

DEFAULT_PATCH = 512
"""Window side for a patch model whose config names no ``patch_size``."""

FOLD_EXAMPLE_SIDE = 64
"""Side of the corner of the input on which BatchNorm folding is traced and checked."""

FOLD_TOLERANCE = 1e-3
"""Largest difference between folded and unfolded fp32 logits on the example, relative to their
largest magnitude (rounding, not a wrong fold, which differs by the logits' own scale)."""

FOLD_MOVED_SHARE = 0.1
"""Share of the example's logits allowed beyond :data:`FOLD_TOLERANCE`. A model that selects
points discretely moves a few logits when rounding reorders tied scores: MagNet's top-k of a
median-filtered score (plateaus of equal values) moved 2.6 % of a 64 x 64 corner's logits at 2
threads with a right fold (0 % at 1 thread). A convolution whose output is read by more than its
BatchNorm moves every logit it reaches, which is all of them behind a mixing layer."""


def fold_outputs_agree(unfolded: torch.Tensor, folded: torch.Tensor) -> bool:
    """True when folding BatchNorm moved at most :data:`FOLD_MOVED_SHARE` of the logits beyond rounding."""
    scale = float(unfolded.abs().max())
    moved = (unfolded - folded).abs() > FOLD_TOLERANCE * scale + 1e-6
    return float(moved.float().mean()) <= FOLD_MOVED_SHARE


def check_source(source: RasterSource, meta: dict[str, Any]) -> None:
    """Refuse inputs the model was not trained on; warn about a missing CRS.

    Args:
        source: the input scene.
        meta: checkpoint metadata (``model.in_channels``, ``input_dtype``).

    Raises:
        InputFileError: the band count or dtype differs from the training data's.
    """
    bands = int(meta["model"]["in_channels"])
    if source.count != bands:
        raise InputFileError(source.where, f"has {source.count} bands, the model was trained on {bands}")
    trained_dtype = meta.get("input_dtype")
    if trained_dtype and np.dtype(source.dtype) != np.dtype(trained_dtype):
        raise InputFileError(
            source.where,
            f"has dtype {source.dtype}, the model was trained on {trained_dtype} (its band statistics are in those units)",
        )
    if source.crs is None:
        warnings.warn(f"{source.where}: no CRS; the output keeps the pixel geometry only", stacklevel=2)


@dataclass
class Predictor:
    """Runs a model over a scene and yields finished rows of classes (and probabilities).

    Holistic models see the whole scene in one forward. Patch models (or any model when
    ``window`` is set) slide ``window = (h, w)`` patches overlapping by ``overlap`` pixels;
    softmax probabilities are blended with weights that ramp linearly across the overlap, so seams
    disappear and every pixel's weights sum to a positive number. Blending accumulates in float32
    over one row of windows only (``K x h x W``), and rows are yielded as soon as no later
    window touches them.

    Attributes:
        model: eval-mode model; ``model(x (1, C, h, w) native dtype) -> logits (1, K, h, w)``.
        num_classes: K.
        ignore_index: class value written where the input is nodata (None: never).
        window: ``(height, width)`` of the sliding windows; None = holistic.
        overlap: overlap between neighbouring windows in pixels (``0 <= overlap < min(window)``).
        device: where the model runs.
        row_progress: called with the number of rows of each strip yielded (a progress bar).
        bf16: run the model under bfloat16 autocast, channels-last (less memory and time on
            accelerators and bf16-capable CPUs, whose bf16 3x3 convolutions are fastest
            channels-last; blending and probabilities stay float32).
    """

    model: nn.Module
    num_classes: int
    ignore_index: int | None = 255
    window: tuple[int, int] | None = None
    overlap: int = 0
    device: str | torch.device = "cpu"
    bf16: bool = False
    row_progress: Callable[[int], Any] | None = None

    def __post_init__(self) -> None:
        if self.bf16:
            self.model.to(memory_format=torch.channels_last)
            if torch.device(self.device).type == "cpu" and not native_bf16_cpu():
                warnings.warn(
                    "--bf16 on a CPU without native bf16 (oneDNN reports none: no AVX512-BF16/AMX): its bf16 "
                    "convolutions run about 7x slower than fp32 here; fp32 is faster on this machine",
                    stacklevel=2,
                )
        if self.window is not None:
            self.window = (int(self.window[0]), int(self.window[1]))
            if min(self.window) < 1 or not 0 <= self.overlap < min(self.window):
                raise ValueError(
                    f"need window >= 1 and overlap in [0, window), got window={self.window}, overlap={self.overlap}"
                )

    def strips(
        self, source: RasterSource, probabilities: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Predict ``source`` and yield its rows top to bottom.

        Args:
            source: the scene.
            probabilities: also yield class probabilities.

        Yields:
            ``(row_off, classes (h, W) uint8, probs (K, h, W) float32 or None)``; consecutive
            strips cover the scene's rows exactly once, in order.
        """
        strips = self._holistic(source, probabilities) if self.window is None else self._sliding(source, probabilities)
        for row, classes, probs in strips:
            yield row, classes, probs
            if self.row_progress is not None:
                self.row_progress(classes.shape[0])

    def _input(self, image: np.ndarray) -> torch.Tensor:
        """``image (C, h, w)`` -> ``(1, C, h, w)`` on the device, channels-last under ``bf16``."""
        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.bf16 else x

    def _forward(self, image: np.ndarray) -> torch.Tensor:
        """``image (C, h, w)`` native dtype -> logits ``(K, h, w)`` float32 on the device."""
        x = self._input(image)
        device_type = torch.device(self.device).type
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
        if isinstance(logits, dict):  # a model left in train mode returns the training dict
            raise RuntimeError("model returned a dict; call model.eval() before predicting")
        if logits.shape[-2:] != x.shape[-2:] or logits.shape[1] != self.num_classes:
            raise RuntimeError(f"model returned {tuple(logits.shape)} for input {tuple(x.shape)}")
        return logits[0].float()

    @contextlib.contextmanager
    def _folded(self, x: torch.Tensor, per_call: bool) -> Iterator[int]:
        """The model with its eval BatchNorms folded into their convolutions (:func:`folded_batchnorm`).

        Traced and checked on the top-left corner of ``x`` (the model's input, ``(1, C, h, w)``),
        under the same banding as the prediction that follows, always in fp32: whether a fold is
        right does not depend on the precision, and bf16 rounding of a random-looking corner's
        logits exceeded a 5 % bound now and then (one of the eight quick benchmark cases in each
        of two runs refused a correct fold), which an fp32 check with a 0.1 % bound does not.

        Args:
            x: the model's input (or its first window).
            per_call: fold each convolution's weight per call, keeping no second copy of the
                weights (one forward per scene), or keep folded copies (many windows); see
                :mod:`~lrss_ds.memory.fold_batchnorm`.
        """
        side = max(min_window(self.model), FOLD_EXAMPLE_SIDE)
        example = x[..., :side, :side]
        device_type = torch.device(self.device).type

        def run() -> torch.Tensor:
            # the prediction's bf16 autocast may already be open around this context
            with torch.inference_mode(), torch.autocast(device_type, enabled=False):
                out = self.model(example)
            return (out["logits"] if isinstance(out, dict) else out).float()

        with folded_batchnorm(self.model, run, fold_outputs_agree, per_call=per_call) as count:
            yield count

    def _finish(
        self,
        probs_or_logits: torch.Tensor,
        image_rows: np.ndarray,
        source: RasterSource,
        probabilities: bool,
        are_probs: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Turn ``(K, h, W)`` scores into uint8 classes (+ float32 probabilities), masking nodata."""
        return finish_rows(probs_or_logits, image_rows, source.nodata, self.ignore_index, probabilities, are_probs)

    def _holistic(
        self, source: RasterSource, probabilities: bool
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """One forward over the whole scene; upsampling, softmax and argmax run in bands of rows.

        The forward runs under :func:`~lrss_ds.memory.banded_inference.banded_eval`: the
        high-resolution layers work in row bands and the logits stay at the network's
        resolution, so only ``PIXEL_BAND_ROWS`` rows of full-resolution logits (and the
        upsampling's temporaries) exist at a time; the writer gathers the strips into tiles.
        Models that are not a ``SegmentationModel`` return full-resolution logits, which are
        then sliced. BatchNorms are folded per call of their convolutions, so no second copy of
        the weights exists beside the model's own.
        """
        image = source.read(0, 0, source.height, source.width)
        x = self._input(image)
        device_type = torch.device(self.device).type
        with torch.inference_mode():
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16), banded_eval(self.model), \
                    self._folded(x, per_call=True):
                logits = row_logits(self.model(x))
            if logits.input_size != tuple(x.shape[-2:]) or logits.num_classes != self.num_classes:
                raise RuntimeError(f"model returned {logits.num_classes} classes at {logits.input_size} "
                                   f"for input {tuple(x.shape)}")
        del x
        for row in range(0, source.height, PIXEL_BAND_ROWS):
            stop = min(row + PIXEL_BAND_ROWS, source.height)
            with torch.inference_mode():
                rows = logits.rows(row, stop)[0]
            classes, probs = self._finish(rows, image[:, row:stop], source, probabilities, are_probs=False)
            yield row, classes, probs

    def _sliding(
        self, source: RasterSource, probabilities: bool
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Blend overlapping windows row by row of windows, yielding rows once final."""
        assert self.window is not None
        height, width, k = source.height, source.width, self.num_classes
        win_h, win_w = min(self.window[0], height), min(self.window[1], width)
        row_starts = window_starts(height, win_h, self.window[0] - self.overlap)
        col_starts = window_starts(width, win_w, self.window[1] - self.overlap)
        weight = torch.from_numpy(np.outer(ramp(win_h, self.overlap), ramp(win_w, self.overlap))).to(self.device)
        # Rows [r, r + win_h) of the current row of windows, in float32 (why: blending in half
        # precision loses the small edge weights); the overlap carries over to the next row.
        acc = torch.zeros(k, win_h, width, dtype=torch.float32, device=self.device)
        weight_sum = torch.zeros(win_h, width, dtype=torch.float32, device=self.device)
        # A bar per scene over its windows (on a terminal only): small windows over a large scene
        # are hundreds of thousands of forwards.
        bar = tqdm(total=len(row_starts) * len(col_starts), desc=source.name, unit="window", leave=False, disable=None)
        first = self._input(source.read(0, 0, win_h, win_w))
        # folded copies of the weights, kept over the windows: re-folding per window cost more
        # than the BatchNorm pass it saves (lrss_ds.memory.fold_batchnorm's measurements)
        with contextlib.closing(bar), self._folded(first, per_call=False):
            for index, row in enumerate(row_starts):
                strip = source.read(row, 0, win_h, width)
                for col in col_starts:
                    probs = torch.softmax(self._forward(strip[:, :, col : col + win_w]), dim=0)
                    acc[:, :, col : col + win_w] += probs * weight
                    weight_sum[:, col : col + win_w] += weight
                    bar.update()
                next_row = row_starts[index + 1] if index + 1 < len(row_starts) else height
                done = next_row - row
                blended = acc[:, :done] / weight_sum[:done]
                classes, probs_out = self._finish(blended, strip[:, :done], source, probabilities, are_probs=True)
                yield row, classes, probs_out
                # Shift the unfinished rows up to become the top of the next row of windows.
                acc = torch.cat([acc[:, done:], torch.zeros(k, done, width, device=self.device)], dim=1)
                weight_sum = torch.cat([weight_sum[done:], torch.zeros(done, width, device=self.device)], dim=0)


def finish_rows(
    probs_or_logits: torch.Tensor,
    image_rows: np.ndarray,
    nodata: float | None,
    ignore_index: int | None,
    probabilities: bool,
    are_probs: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn a strip's scores into uint8 classes (and float32 probabilities), nodata masked.

    Args:
        probs_or_logits: ``(K, h, W)`` logits, or probabilities when ``are_probs``.
        image_rows: ``(C, h, W)`` the input rows (for the nodata mask).
        nodata: the input's nodata value, or None.
        ignore_index: the class written where every band is nodata (None: never).
        probabilities: also return probabilities (NaN where nodata).
        are_probs: ``probs_or_logits`` are already probabilities.

    Returns:
        ``(classes (h, W) uint8, probs (K, h, W) float32 or None)``.
    """
    # max's indices are argmax's (the first maximum), three times faster over the class axis on CPU
    classes = probs_or_logits.max(dim=0).indices.to(torch.uint8).cpu().numpy()
    probs = None
    if probabilities:
        probs_t = probs_or_logits if are_probs else torch.softmax(probs_or_logits, dim=0)
        probs = probs_t.cpu().numpy().astype(np.float32, copy=False)
    mask = _nodata_mask(image_rows, nodata)
    if mask is not None and mask.any():
        if ignore_index is not None:
            classes[mask] = ignore_index
        if probs is not None:
            probs[:, mask] = np.nan
    return classes, probs


def window_starts(total: int, size: int, stride: int) -> list[int]:
    """Offsets of windows of ``size`` every ``stride`` pixels, the last one flush with the end.

    Args:
        total: image extent; size: window extent (``<= total``); stride: step (``>= 1``).

    Returns:
        increasing offsets starting at 0 whose windows cover ``[0, total)``.
    """
    starts = list(range(0, total - size + 1, stride))
    if starts[-1] != total - size:
        starts.append(total - size)
    return starts


def ramp(size: int, overlap: int) -> np.ndarray:
    """1-D blending weights: 1 in the middle, rising linearly over ``overlap`` pixels at each end.

    Args:
        size: window extent; overlap: overlap with the neighbouring window.

    Returns:
        ``(size,)`` float32 weights in ``(0, 1]``: no pixel has weight 0, so image borders (covered
        by a single window) normalise fine.
    """
    index = np.arange(size, dtype=np.float32)
    edge = np.minimum(index + 1, size - index) / (overlap + 1)
    return np.minimum(edge, 1.0).astype(np.float32)


def _nodata_mask(image: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """``(h, w)`` bool mask of pixels where every band is ``nodata`` (None if no nodata value)."""
    if nodata is None:
        return None
    if isinstance(nodata, float) and math.isnan(nodata):
        return np.isnan(image).all(axis=0)
    return (image == nodata).all(axis=0)


def predictor_for(
    model: nn.Module,
    meta: dict[str, Any],
    window: int | None = None,
    overlap: int | None = None,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> Predictor:
    """The predictor a checkpoint asks for: holistic, or sliding windows for patch models.

    A model config with ``mode == "patch"`` slides windows of its ``patch_size`` (an int or
    ``[h, w]``, default 512) overlapping by its ``overlap`` (default a quarter of the window);
    every other model (holistic, downsampled, and GLNet/GLSNet, which cut their own patches
    inside) sees the whole scene. ``window`` forces square sliding windows of that size.

    Args:
        model: the eval-mode model.
        meta: checkpoint metadata.
        window: override: square window size (0 forces holistic).
        overlap: override: window overlap in pixels (default: the config's, else window / 4).
        device: where the model runs.
        bf16: bfloat16 autocast.

    Returns:
        the predictor.

    Warns:
        UserWarning: windows smaller than the model's input multiple (see :func:`min_window`).

    Raises:
        LrssError: an overlap that is not smaller than the window.
    """
    config = meta["model"]
    size: tuple[int, int] | None = None
    if window is None and config.get("mode") == "patch":
        patch = config.get("patch_size") or DEFAULT_PATCH
        size = (int(patch), int(patch)) if isinstance(patch, (int, float)) else (int(patch[0]), int(patch[1]))
        if overlap is None and config.get("overlap") is not None:
            overlap = int(config["overlap"])
    elif window:
        size = (int(window), int(window))
    if size is not None and overlap is None:
        overlap = min(size) // 4
    if size is not None and not 0 <= int(overlap or 0) < min(size):
        raise LrssError("--overlap", f"must be in [0, {min(size)}) for windows of {size[0]}x{size[1]}, got {overlap}")
    if size is not None:
        _warn_small_window(model, config, size)
    dataset = meta.get("dataset") or {}
    ignore = dataset.get("ignore_index", 255)
    return Predictor(
        model=model,
        num_classes=int(config["num_classes"]),
        ignore_index=ignore if ignore is not None and 0 <= int(ignore) <= 255 else None,
        window=size,
        overlap=int(overlap or 0),
        device=device,
        bf16=bf16,
    )


def min_window(model: nn.Module) -> int:
    """The smallest useful window side for ``model``: what it pads every input to a multiple of.

    Models pad H and W up to ``pad_multiple`` (the stride of their coarsest feature map, at least
    their ``output_stride``); a smaller window is padded to that size, so most of each forward
    is spent on padding and its few real pixels see almost no context.

    Returns:
        ``max(pad_multiple, output_stride)``, or 1 for a model that declares neither.
    """
    return max(int(getattr(model, "pad_multiple", 1) or 1), int(getattr(model, "output_stride", 1) or 1))


def _warn_small_window(model: nn.Module, config: dict[str, Any], size: tuple[int, int]) -> None:
    """Warn when windows of ``size`` are smaller than :func:`min_window` of ``model``."""
    minimum = min_window(model)
    if min(size) >= minimum:
        return
    padded = [-(-side // minimum) * minimum for side in size]
    work = padded[0] * padded[1] / (size[0] * size[1])
    warnings.warn(
        f"--window {size[0]}x{size[1]} is smaller than {config.get('name', 'the model')}'s minimum of {minimum} px "
        f"(its input multiple): each window is padded to {padded[0]}x{padded[1]}, {work:.0f}x the work per pixel, "
        f"with almost no context; use --window {minimum} or more (or 0 for the whole scene)",
        stacklevel=3,
    )

