"""`lrss-ds predict`: write georeferenced class maps (and class probabilities) for whole scenes."""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import functools
import glob
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import rasterio
import torch
from rasterio._err import CPLE_BaseError  # GDAL's own errors; rasterio.errors does not re-export them
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.shutil import copy as gdal_copy
from rasterio.windows import Window
from torch import nn
from tqdm import tqdm

from lrss_ds.engine.interrupt import terminate_as_exit
from lrss_ds.engine.model_io import load_model
from lrss_ds.engine.scene_batch import PredictionLog, Ranks, pending, timed
from lrss_ds.engine.temporaries import is_temporary, remove_stale_temporaries, temporary_name
from lrss_ds.errors import InputFileError, LrssError, OutputError, OutputExistsError, StoreError, underlying_cause
from lrss_ds.memory.banded_inference import PIXEL_BAND_ROWS, banded_eval, row_logits

BLOCK = 512
"""Tile size of the written GeoTIFFs, and the row height in which results are streamed out."""

RASTER_SUFFIXES = (".tif", ".tiff", ".TIF", ".TIFF")

# GDAL's block cache defaults to 5 % of RAM and fills with dirty tiles while we stream rows out;
# a fixed cap keeps the writer's memory independent of the scene and the machine.
GDAL_CACHE_MB = 256


# ----------------------------------------------------------------------------- input rasters


@dataclass
class RasterSource:
    """One scene to predict: where it is, its geometry, and how to read a window of it.

    Attributes:
        name: output stem (file stem or scene id).
        where: what to name in error messages (the file, or ``store:scene``).
        count, height, width: bands C and size.
        dtype: numpy dtype name of the bands (e.g. ``"uint8"``).
        crs, transform: rasterio georeference (``crs`` None when the input has none).
        nodata: the input's nodata value (pixels where every band equals it are written as
            the ignore value), or None.
        path: the raster file it is read from (None for a store scene); no output may be it.
    """

    name: str
    where: str
    count: int
    height: int
    width: int
    dtype: str
    crs: Any
    transform: Any
    nodata: float | None
    _reader: Any = None
    path: Path | None = None

    def read(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        """Read a window in the native dtype.

        Args:
            row, col: top-left pixel of the window.
            height, width: window size.

        Returns:
            ``(C, height, width)`` array.
        """
        return self._reader(row, col, height, width)


def open_geotiff(path: str | Path) -> RasterSource:
    """Describe a GeoTIFF (or any GDAL raster) as a :class:`RasterSource`.

    Args:
        path: the raster file.

    Returns:
        the source; reads open the file each time, so no handle is held between scenes.

    Raises:
        InputFileError: the file is missing or not a readable raster, or its bands differ in dtype.
    """
    path = Path(path)
    try:
        with _quiet_georef(), rasterio.open(path) as ds:
            if len(set(ds.dtypes)) != 1:
                raise InputFileError(path, f"bands have different dtypes {sorted(set(ds.dtypes))}")
            crs, transform = ds.crs, ds.transform
            info = dict(count=ds.count, height=ds.height, width=ds.width, dtype=ds.dtypes[0], nodata=ds.nodata)
    except RasterioIOError as error:
        raise InputFileError(path, f"not a readable raster: {underlying_cause(error)}") from error

    def read(row: int, col: int, height: int, width: int) -> np.ndarray:
        try:
            with _quiet_georef(), rasterio.open(path) as ds:
                return ds.read(window=Window(col, row, width, height))
        except RasterioIOError as error:
            raise InputFileError(path, f"read failed: {underlying_cause(error)}") from error

    return RasterSource(
        name=path.stem, where=str(path), crs=crs, transform=transform, _reader=read, path=path, **info
    )


def open_store_scene(store_path: str | Path, scene: str) -> RasterSource:
    """Describe one scene of a tile store as a :class:`RasterSource`.

    Args:
        store_path: the Zarr tile store.
        scene: the scene id.

    Returns:
        the source; its windows are read from the store.

    Raises:
        StoreError: the store cannot be opened or has no such scene.
    """
    from lrss_ds.data.store import TileStore  # data sits below engine; imported late for CLI speed

    store = TileStore.open(store_path)
    if scene not in store.scenes():
        raise StoreError(store_path, f"no scene {scene!r} (scenes: {', '.join(store.scenes()[:10])}...)")
    count, height, width = store.shape(scene)
    crs, transform = store.georef(scene)

    def read(row: int, col: int, h: int, w: int) -> np.ndarray:
        return store.read_image(scene, window=(row, col, h, w))

    return RasterSource(
        name=scene,
        where=f"{store_path}:{scene}",
        count=int(count),
        height=int(height),
        width=int(width),
        dtype=np.dtype(store.dtype(scene)).name,
        crs=crs,
        transform=transform if transform is not None else rasterio.Affine.identity(),
        nodata=store.nodata(scene),
        _reader=read,
    )


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


# ----------------------------------------------------------------------------- inference


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

    def _finish(
        self,
        probs_or_logits: torch.Tensor,
        image_rows: np.ndarray,
        source: RasterSource,
        probabilities: bool,
        are_probs: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Turn ``(K, h, W)`` scores into uint8 classes (+ float32 probabilities), masking nodata."""
        classes = probs_or_logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
        probs = None
        if probabilities:
            probs_t = probs_or_logits if are_probs else torch.softmax(probs_or_logits, dim=0)
            probs = probs_t.cpu().numpy().astype(np.float32, copy=False)
        mask = _nodata_mask(image_rows, source.nodata)
        if mask is not None and mask.any():
            if self.ignore_index is not None:
                classes[mask] = self.ignore_index
            if probs is not None:
                probs[:, mask] = np.nan
        return classes, probs

    def _holistic(
        self, source: RasterSource, probabilities: bool
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """One forward over the whole scene; upsampling, softmax and argmax run in bands of rows.

        The forward runs under :func:`~lrss_ds.memory.banded_inference.banded_eval`: the
        high-resolution layers work in row bands and the logits stay at the network's
        resolution, so only ``PIXEL_BAND_ROWS`` rows of full-resolution logits (and the
        upsampling's temporaries) exist at a time; the writer gathers the strips into tiles.
        Models that are not a ``SegmentationModel`` return full-resolution logits, which are
        then sliced.
        """
        image = source.read(0, 0, source.height, source.width)
        x = self._input(image)
        device_type = torch.device(self.device).type
        with torch.inference_mode():
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16), banded_eval(self.model):
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
        with contextlib.closing(bar):
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
        patch = config.get("patch_size") or BLOCK
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


# ----------------------------------------------------------------------------- writing


def class_colormap(dataset: dict[str, Any], num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """The GeoTIFF colour map: the dataset palette, or evenly spaced hues if it has none.

    Args:
        dataset: ``DatasetSpec.to_dict()`` (``palette``, ``ignore_index``).
        num_classes: K.

    Returns:
        ``{class: (r, g, b, 255)}`` plus the ignore value as transparent black.
    """
    palette = dataset.get("palette")
    colours: dict[int, tuple[int, int, int, int]] = {}
    for k in range(num_classes):
        if palette and k < len(palette):
            r, g, b = (int(v) for v in palette[k][:3])
        else:
            r, g, b = (int(255 * v) for v in colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.95))
        colours[k] = (r, g, b, 255)
    ignore = dataset.get("ignore_index", 255)
    if ignore is not None and num_classes <= int(ignore) <= 255:
        colours[int(ignore)] = (0, 0, 0, 0)
    return colours


class _RowBuffer:
    """Collects yielded rows into BLOCK-row, tile-aligned strips before writing them.

    Why: writing arbitrary row ranges into a compressed tiled GeoTIFF makes GDAL re-encode
    partly written tiles; tile-aligned strips are written once each.
    """

    def __init__(self, dataset: Any, bands: int, width: int, dtype: np.dtype) -> None:
        self.dataset, self.width = dataset, width
        self.buffer = np.zeros((bands, BLOCK, width), dtype=dtype)
        self.start = 0  # first image row held in the buffer
        self.filled = 0  # rows of the buffer filled so far

    def add(self, rows: np.ndarray) -> None:
        """Append ``rows (bands, h, W)``, the next rows of the image."""
        while rows.shape[1]:
            take = min(BLOCK - self.filled, rows.shape[1])
            self.buffer[:, self.filled : self.filled + take] = rows[:, :take]
            self.filled += take
            rows = rows[:, take:]
            if self.filled == BLOCK:
                self.flush()

    def flush(self) -> None:
        """Write the rows held so far."""
        if self.filled:
            self.dataset.write(self.buffer[:, : self.filled], window=Window(0, self.start, self.width, self.filled))
            self.start += self.filled
            self.filled = 0


def write_prediction(
    source: RasterSource,
    predictor: Predictor,
    meta: dict[str, Any],
    output: Path,
    probabilities: Path | None = None,
    overviews: bool = True,
    compress: str = "deflate",
) -> None:
    """Predict one scene into a cloud-optimised class-map GeoTIFF (and a probability GeoTIFF).

    Rows are streamed into a tiled GeoTIFF under a temporary name, which GDAL's COG driver then
    copies (block by block) into the final layout — tiled 512, compressed, overviews by nearest
    neighbour unless disabled — under a second temporary name that is renamed to ``output`` at
    the end; a failure leaves neither.

    Args:
        source: the scene.
        predictor: how to run the model.
        meta: checkpoint metadata (dataset palette, classes, ignore index).
        output: class-map path: uint8, 1 band, input CRS/transform/size, colour map, ignore
            value as nodata.
        probabilities: optional path for K float16 bands of class probabilities.
        overviews: build overviews.
        compress: ``"deflate"`` or ``"zstd"``.

    Raises:
        OutputError: an output cannot be written (full disk, refusing directory, GDAL's reason),
            naming it; nothing is left at its final name or under a temporary one.
    """
    dataset = meta.get("dataset") or {}
    k = predictor.num_classes
    temporaries: list[Path] = []
    outputs = [output] + ([probabilities] if probabilities else [])
    try:
        class_part = _temporary(output, "part", temporaries)
        prob_part = _temporary(probabilities, "part", temporaries) if probabilities else None
        base = dict(
            driver="GTiff",
            width=source.width,
            height=source.height,
            crs=source.crs,
            transform=source.transform,
            tiled=True,
            blockxsize=BLOCK,
            blockysize=BLOCK,
            BIGTIFF="IF_SAFER",
            compress="zstd",
            ZSTD_LEVEL=1,  # fast: this copy only lives until the COG copy below
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(_quiet_georef())
            stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB))
            class_ds = stack.enter_context(
                rasterio.open(class_part, "w", count=1, dtype="uint8", nodata=predictor.ignore_index, **base)
            )
            class_ds.write_colormap(1, class_colormap(dataset, k))
            class_ds.set_band_description(1, "class")
            class_ds.update_tags(
                classes=json.dumps(dataset.get("classes") or [str(i) for i in range(k)]),
                model=json.dumps(meta["model"]),
            )
            class_rows = _RowBuffer(class_ds, 1, source.width, np.dtype("uint8"))
            prob_rows = None
            if prob_part is not None:
                # float32 + NBITS=16 is how GDAL 3.10 stores IEEE half floats in a GeoTIFF
                # (rasterio 1.4 has no float16 dtype).
                prob_ds = stack.enter_context(
                    rasterio.open(prob_part, "w", count=k, dtype="float32", nbits=16, nodata=float("nan"), **base)
                )
                for index, name in enumerate(dataset.get("classes") or [], start=1):
                    if index <= k:
                        prob_ds.set_band_description(index, str(name))
                prob_rows = _RowBuffer(prob_ds, k, source.width, np.dtype("float32"))
            for _, classes, probs in predictor.strips(source, probabilities=prob_rows is not None):
                class_rows.add(classes[None])
                if prob_rows is not None and probs is not None:
                    prob_rows.add(probs)
            class_rows.flush()
            if prob_rows is not None:
                prob_rows.flush()
        finals = [(class_part, output, "NEAREST", {})]
        if probabilities and prob_part:
            finals.append((prob_part, probabilities, "AVERAGE", {"NBITS": 16}))
        for part, final, resampling, extra in finals:
            cog = _temporary(final, "tmp", temporaries)
            with _quiet_georef(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
                gdal_copy(
                    part,
                    cog,
                    driver="COG",
                    COMPRESS=compress.upper(),
                    BLOCKSIZE=BLOCK,
                    BIGTIFF="IF_SAFER",
                    OVERVIEWS="AUTO" if overviews else "NONE",
                    RESAMPLING=resampling,
                    **extra,
                )
        for part, final, _, _ in finals:
            os.replace(temporary_name(final, "tmp"), final)
    except (OSError, CPLE_BaseError) as error:  # RasterioIOError is an OSError
        failure = _write_failure(outputs, error)
        if failure is None:
            raise
        raise failure from None
    finally:
        for path in temporaries:
            with contextlib.suppress(OSError):  # a failing clean-up must not hide the cause
                path.unlink(missing_ok=True)


def _temporary(final: Path, kind: str, registry: list[Path]) -> Path:
    """A temporary name for ``final``, created empty now and recorded in ``registry`` for cleanup.

    Why create it: a directory that refuses files is then found before the model runs, and
    with the operating system's reason (GDAL only says the file could not be created).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    path = temporary_name(final, kind)
    registry.append(path)
    open(path, "wb").close()  # builtin open: GDAL overwrites it; Path.open bypasses test doubles
    return path


def _write_failure(outputs: list[Path], error: BaseException) -> OutputError | None:
    """Say in one line why writing ``outputs`` failed: the operating system's reason where there is one.

    GDAL reports a refused block write as "Write failed. See previous exception for details.",
    and libtiff prints the reason ("No space left on device") straight to stderr, out of
    Python's reach. Appending to the temporary GDAL was writing repeats the refusal as an
    ``OSError`` whose errno names it; when that append succeeds, GDAL's own message is the cause.

    Returns:
        the error to raise, or None for an ``OSError`` about another file (not a write of ours).
    """
    if isinstance(error, OSError) and error.errno is not None:
        names = {str(error.filename), str(getattr(error, "filename2", None))}
        for final in outputs:
            if names & {str(final), *(str(temporary_name(final, kind)) for kind in ("part", "tmp"))}:
                return OutputError.from_os_error(final, error)
        return None
    for final in outputs:
        for kind in ("part", "tmp"):
            refusal = _append_refusal(temporary_name(final, kind))
            if refusal is not None:
                return OutputError.from_os_error(final, refusal)
    return OutputError(outputs[0], f"cannot write: {underlying_cause(error)}; an earlier file at this name, if any, "
                                   "is unchanged")


def _append_refusal(path: Path) -> OSError | None:
    """The ``OSError`` appending a block to an existing ``path`` raises, or None (also when it is absent)."""
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "ab") as handle:
            handle.write(bytes(4096))  # one file-system block: a full disk cannot take it
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return error
    return None


@contextlib.contextmanager
def _quiet_georef() -> Iterator[None]:
    """Silence rasterio's NotGeoreferencedWarning: a missing CRS gets our own one-line warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lrss-ds predict`` options to ``parser``."""
    parser.add_argument(
        "--checkpoint", required=True, help="run directory, DeepSpeed checkpoint tag directory or exported weights file"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="GeoTIFF, directory of GeoTIFFs, or glob pattern (quote it)")
    source.add_argument("--store", help="tile store to read scenes from (with --scene)")
    parser.add_argument("--scene", action="append", help="scene id in --store (repeatable)")
    parser.add_argument(
        "--output",
        required=True,
        help="output GeoTIFF for one file or scene; a directory for a directory, glob or several",
    )
    parser.add_argument(
        "--probabilities",
        help="also write per-class float16 probabilities here (a file or a directory, like --output)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="sliding-window size (default: holistic, or the patch size of patch models; 0 forces holistic)",
    )
    parser.add_argument(
        "--overlap", type=int, default=None, help="sliding-window overlap in pixels (default: window/4)"
    )
    parser.add_argument("--no-overviews", dest="overviews", action="store_false", help="do not build overviews")
    parser.add_argument(
        "--compress", choices=("deflate", "zstd"), default="deflate", help="GeoTIFF compression (default deflate)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--bf16", action="store_true", help="run the model under bfloat16 autocast, channels-last")
    parser.add_argument(
        "--resume", action="store_true", help="skip scenes whose outputs exist and are finished (a rerun of a batch)"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``lrss-ds predict``; returns the exit code."""
    if args.store and not args.scene:
        raise LrssError("--scene", "give at least one --scene with --store")
    if args.scene and not args.store:
        raise LrssError("--scene", "needs --store")
    if args.window is not None and args.window < 0:
        raise LrssError("--window", f"must be >= 0, got {args.window}")
    sources: list[RasterSource] = (
        [open_store_scene(args.store, scene) for scene in args.scene]
        if args.store
        else [open_geotiff(p) for p in expand_inputs(args.input)]
    )
    several = bool(args.input) and not Path(args.input).is_file()  # a directory or a glob
    probabilities = Path(args.probabilities) if args.probabilities else None
    ranks = Ranks.join()
    outputs = plan_outputs(
        sources, Path(args.output), probabilities, args.overwrite or args.resume, directories=several
    )
    device = ranks.device(resolve_device(args.device))
    model, meta = load_model(args.checkpoint, device=device)
    for source in sources:  # check every input before spending time on any
        check_source(source, meta)
    predictor = predictor_for(model, meta, window=args.window, overlap=args.overlap, device=device, bf16=args.bf16)
    common = {"model": meta["model"], "checkpoint": str(Path(args.checkpoint).resolve()), "rank": ranks.rank,
              "threads": torch.get_num_threads()}
    log = PredictionLog(outputs[0][0].parent, common, say=tqdm.write)
    jobs = pending(ranks.share(list(zip(sources, outputs))), predictor.num_classes, args.resume, args.overwrite,
                   on_skip=log.skip)
    # only files whose writer process is gone: another rank's live temporaries stay
    for directory in dict.fromkeys(path.parent for pair in outputs for path in pair if path is not None):
        for leftover in remove_stale_temporaries(directory):
            print(f"removed {leftover}, left by a predict that was killed", file=sys.stderr)
    ranks.barrier()  # every rank has checked the outputs before any rank writes one
    with terminate_as_exit("lrss-ds predict"):  # SIGTERM unwinds through write_prediction's clean-up
        progress = tqdm(jobs, desc=f"predict (rank {ranks.rank})" if ranks.world_size > 1 else "predict",
                        unit="scene", disable=None)
        for source, (output, probabilities) in progress:
            progress.set_postfix_str(source.name)
            with tqdm(total=source.height, desc=source.name, unit="row", leave=False, disable=None) as rows:
                predictor.row_progress = rows.update
                seconds, peak = timed(functools.partial(
                    write_prediction, source, predictor, meta, output, probabilities,
                    overviews=args.overviews, compress=args.compress,
                ))
            log.add(source, output, probabilities, seconds, peak)
            tqdm.write(f"wrote {output}" + (f" and {probabilities}" if probabilities else "") + f" in {seconds:.1f} s")
    ranks.barrier()
    if ranks.rank == 0:
        tqdm.write(f"summary in {log.merge()}")
    return 0


def expand_inputs(pattern: str) -> list[Path]:
    """The raster files a ``--input`` value names: a file, a directory's rasters, or a glob.

    Temporaries of a prediction writer (``.<name>.part-<pid>.tif``, see :func:`is_temporary`)
    in a directory or a glob are skipped: they are unfinished or left by a killed run.

    Raises:
        InputFileError: nothing matches.
    """
    path = Path(pattern)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in RASTER_SUFFIXES and p.is_file())
    elif glob.has_magic(pattern):
        found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    else:
        found = [path] if path.exists() else []  # a file named on its own is read as asked
    if path.is_dir() or glob.has_magic(pattern):
        found = [p for p in found if not is_temporary(p)]
    if not found:
        raise InputFileError(
            pattern, "no input raster found (give a GeoTIFF, a directory of .tif files or a quoted glob)"
        )
    return found


def plan_outputs(
    sources: Sequence[RasterSource],
    output: Path,
    probabilities: Path | None,
    overwrite: bool,
    directories: bool = False,
) -> list[tuple[Path, Path | None]]:
    """Decide every output path up front and refuse existing ones unless ``overwrite``.

    ``output`` (and ``probabilities``) are directories receiving ``<name>.tif`` when there are
    several sources, when ``directories`` is set (the input was a directory or a glob, so the
    number of matches should not change what ``--output`` means), or when they already are
    directories; otherwise they are the files to write.

    Args:
        sources: the scenes, in order.
        output: ``--output``.
        probabilities: ``--probabilities`` or None.
        overwrite: allow replacing existing files.
        directories: treat ``output``/``probabilities`` as directories even for one source.

    Returns:
        ``(class map path, probabilities path or None)`` per source.

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is false.
        OutputError: an output is one of the input files (same path, hard link or symlink).
        LrssError: two inputs would write the same output.
    """

    def target(base: Path, source: RasterSource) -> Path:
        as_directory = directories or len(sources) > 1 or base.is_dir()
        return base / f"{source.name}.tif" if as_directory else base

    planned = [(target(output, s), target(probabilities, s) if probabilities else None) for s in sources]
    inputs = {_file_id(s.path): s.path for s in sources if s.path is not None and _file_id(s.path)}
    seen: dict[Path, str] = {}
    for source, paths in zip(sources, planned):
        for path in (p for p in paths if p is not None):
            if path in seen:
                raise LrssError(
                    path, f"both {seen[path]} and {source.where} would be written here; give inputs distinct names"
                )
            seen[path] = source.where
            same_input = inputs.get(_file_id(path))
            if same_input is not None:
                raise OutputError(
                    path,
                    f"is the input {same_input} ({_how_same(path, same_input)}); writing there would destroy it, "
                    "so it is refused even with --overwrite: choose another --output",
                )
            if path.exists() and not overwrite:
                raise OutputExistsError(path, "already exists; pass --overwrite to replace it")
    return planned


def _file_id(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``path`` resolves to (following symlinks), or None if none."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _how_same(output: Path, source: Path) -> str:
    """Why ``output`` is ``source``: the same path, a symlink, or a hard link."""
    if output.absolute() == source.absolute():
        return "the same path"
    if output.resolve() == source.resolve():
        return "the same file through a symlink"
    return "a hard link to the same file"


def resolve_device(name: str) -> torch.device:
    """The ``--device`` a user asked for, checked against this machine and this PyTorch build.

    Args:
        name: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or any other
            PyTorch device string.

    Returns:
        the device.

    Raises:
        LrssError: an unknown device string, or a device this build or machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LrssError("--device", f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        build = "has no CUDA (a CPU-only build)" if device.type == "cuda" and torch.version.cuda is None else ""
        problem = f"this PyTorch {torch.__version__} {build}" if build else f"no {device.type} device is available"
        raise LrssError("--device", f"{name!r} asked, but {problem}; use --device cpu or auto")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise LrssError("--device", f"{name!r} asked, but this machine has {count} {device.type} device(s)")
    return device
