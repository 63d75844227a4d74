"""Window reads of a plain Zarr v3 array that decode only the chunk files the window overlaps."""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

_BLOSC_HEADER = 16  # blosc1 frame header bytes
_BLOSC_MEMCPYED = 0x02  # header flag: payload stored as is


class ChunkReader:
    """Reads windows of a plain Zarr v3 array by decoding only the chunk files they overlap.

    zarr-python's read path costs about a millisecond of asyncio bookkeeping per chunk and per
    call, which halves the rate of 512x512 window reads (measured in
    benchmarks/results/tilestore_io.md). For the layout this store writes (regular chunks,
    default "/" chunk keys, ``bytes`` + optional ``blosc``, no sharding) the chunk files are
    read and decoded here directly, on a small thread pool (blosc and file reads release the
    GIL). Any other layout is read through zarr unchanged: ``ChunkReader.for_array`` returns
    None for it.

    Args:
        directory: the array's directory.
        shape, chunks: array and chunk shapes.
        dtype: array dtype.
        fill_value: value of chunks that were never written (zarr skips empty chunks).
        blosc: whether chunks are blosc frames (else raw bytes).
    """

    def __init__(self, directory: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
                 fill_value: Any, blosc: bool) -> None:
        self.directory = directory
        self.shape = shape
        self.chunks = chunks
        self.dtype = dtype
        self.fill_value = fill_value
        self.blosc = blosc
        self._chunk_bytes = int(np.prod(chunks)) * dtype.itemsize
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None

    @classmethod
    def for_array(cls, directory: Path) -> ChunkReader | None:
        """Return a reader for the array at ``directory``, or None if its layout is not the simple one."""
        try:
            meta = json.loads((directory / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs", [])
        names = [c.get("name") for c in codecs]
        key = meta.get("chunk_key_encoding", {})
        grid = meta.get("chunk_grid", {})
        if (meta.get("zarr_format") != 3 or meta.get("storage_transformers") or names not in (["bytes"], ["bytes", "blosc"])
                or key.get("name") != "default" or key.get("configuration", {}).get("separator", "/") != "/"
                or grid.get("name") != "regular"):
            return None
        dtype = np.dtype(meta.get("data_type", ""))  # raises TypeError for zarr-only types
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        if dtype.itemsize > 1 and endian != sys.byteorder:
            return None
        return cls(directory, tuple(meta["shape"]), tuple(grid["configuration"]["chunk_shape"]), dtype,
                   meta.get("fill_value", 0), blosc="blosc" in names)

    def _scratch(self) -> np.ndarray:
        # Per-thread scratch chunk: reusing it avoids a fresh mmap + page faults per chunk.
        chunk = getattr(self._local, "chunk", None)
        if chunk is None:
            chunk = self._local.chunk = np.empty(self.chunks, self.dtype)
        return chunk

    def _decode_into(self, index: tuple[int, ...], out: np.ndarray, region: tuple[slice, ...],
                     inside: tuple[slice, ...]) -> None:
        from numcodecs import blosc

        path = self.directory.joinpath("c", *map(str, index))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            out[region] = self.fill_value
            return
        if size == 0:
            raise OSError(f"{path}: empty chunk file")
        if not self.blosc and size != self._chunk_bytes:
            raise OSError(f"{path}: raw chunk of {size} bytes, expected {self._chunk_bytes}")
        # Read straight from the page cache through mmap: one copy fewer than read-then-decode.
        with open(path, "rb", buffering=0) as handle, \
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if not self.blosc:
                offset = 0
            elif size == _BLOSC_HEADER + self._chunk_bytes and mapped[2] & _BLOSC_MEMCPYED:
                offset = _BLOSC_HEADER  # blosc kept this chunk as is (incompressible pixels)
            else:
                offset = None
            if offset is None:
                chunk = self._scratch()
                blosc.decompress(mapped, chunk)
                out[region] = chunk[inside]
            else:
                payload = np.frombuffer(mapped, self.dtype, offset=offset).reshape(self.chunks)
                out[region] = payload[inside]
                del payload  # the mmap cannot close while a view of it exists

    def read(self, box: tuple[slice, ...]) -> np.ndarray:
        """Return ``array[box]`` for a box of unit-step slices within the array."""
        starts = [b.start for b in box]
        stops = [b.stop for b in box]
        out = np.empty([e - s for s, e in zip(starts, stops)], self.dtype)
        ranges = [range(s // c, (e - 1) // c + 1) for s, e, c in zip(starts, stops, self.chunks)]
        jobs = []
        for index in np.ndindex(*[len(r) for r in ranges]):
            chunk_index = tuple(r[i] for r, i in zip(ranges, index))
            region, inside = [], []
            for ci, s, e, c in zip(chunk_index, starts, stops, self.chunks):
                lo, hi = max(s, ci * c), min(e, (ci + 1) * c)
                region.append(slice(lo - s, hi - s))
                inside.append(slice(lo - ci * c, hi - ci * c))
            jobs.append((chunk_index, tuple(region), tuple(inside)))
        # Even a single chunk is decoded on the pool: numcodecs' blosc uses its global context
        # and internal threads (behind a lock) when called from the main thread, which is
        # slower on a busy machine than one plain decode per pool thread.
        for future in [self._executor().submit(self._decode_into, idx, out, reg, ins) for idx, reg, ins in jobs]:
            future.result()
        return out

    def _executor(self) -> ThreadPoolExecutor:
        # A pool does not survive fork: make a new one in a child process.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
            self._pool_pid = os.getpid()
        return self._pool
