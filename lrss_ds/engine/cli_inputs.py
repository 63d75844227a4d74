"""What the ``predict`` and ``evaluate`` command lines name: raster files and a device."""

from __future__ import annotations

import glob
from pathlib import Path

import torch

from lrss_ds.data.rasters import RASTER_SUFFIXES
from lrss_ds.engine.temporaries import is_temporary
from lrss_ds.errors import InputFileError, LrssError


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
