"""Write a predictor's rows into cloud-optimised GeoTIFFs: the class map and class probabilities."""

from __future__ import annotations

import colorsys
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import rasterio
from rasterio._err import CPLE_BaseError  # GDAL's own errors; rasterio.errors does not re-export them
from rasterio.shutil import copy as gdal_copy
from rasterio.windows import Window

from lrss_ds.data.rasters import RasterSource, quiet_georef
from lrss_ds.engine.temporaries import temporary_name
from lrss_ds.errors import OutputError, underlying_cause

BLOCK = 512
"""Tile size of the written GeoTIFFs, and the row height in which results are streamed out."""

class StripSource(Protocol):
    """What the writer takes rows from: a :class:`~lrss_ds.engine.inference.Predictor`, or a spatial
    group's first rank (:class:`~lrss_ds.engine.spatial_predict.SpatialPredictor`)."""

    num_classes: int
    ignore_index: int | None

    def strips(
        self, source: RasterSource, probabilities: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """``(row_off, classes (h, W) uint8, probs (K, h, W) float32 or None)``, top to bottom, once each."""
        ...


# GDAL's block cache defaults to 5 % of RAM and fills with dirty tiles while we stream rows out;
# a fixed cap keeps the writer's memory independent of the scene and the machine.
GDAL_CACHE_MB = 256


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
    predictor: StripSource,
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
        predictor: where the rows come from (how the model runs).
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
            stack.enter_context(quiet_georef())
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
            with quiet_georef(), rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB):
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

