"""`lrss-ds info --check`: verify every scene of a tile store and name each damaged one.

A scene is intact when its group is marked complete and registered in the root, both arrays'
metadata are readable with the recorded shape and pixel type, every chunk file of the chunk grid
exists (for scenes ingested with ``all_chunks_written``; older scenes left all-fill chunks
unwritten) and every chunk decodes to its full size. Blosc frames carry no checksum, so a chunk
whose compressed bytes were altered but still decode is not detected.
"""

from __future__ import annotations

import json
from pathlib import Path
import zarr

from lrss_ds.data.chunk_reader import ChunkReader
from lrss_ds.data.store import TileStore
from lrss_ds.data.store_format import ATTR_KEY, PARTIAL_DIR, missing_chunks
from lrss_ds.errors import StoreError


def _array_problem(directory: Path, shape: list[int], dtype: str, all_chunks: bool) -> str | None:
    """Return what is wrong with the array at ``directory``, or None."""
    name = directory.name
    try:
        meta = json.loads((directory / "zarr.json").read_text())
    except (OSError, ValueError):
        return f"{name} metadata missing or unreadable"
    if list(meta.get("shape", [])) != list(shape):
        return f"{name} shape {meta.get('shape')} differs from the recorded {shape}"
    if meta.get("data_type") != dtype:
        return f"{name} type {meta.get('data_type')} differs from the recorded {dtype}"
    try:
        missing = missing_chunks(directory)
    except StoreError as error:
        return f"{name}: {error.problem}"
    if missing and all_chunks:
        return f"{name} chunk {missing[0]} missing ({len(missing)} of the grid's chunks missing)"
    reader = ChunkReader.for_array(directory)
    if reader is None:
        try:
            zarr.open_array(str(directory), mode="r")[...]
        except Exception as error:  # zarr raises many types for a damaged chunk
            return f"{name} unreadable: {error}"
        return None
    # One row of chunks at a time: memory stays one chunk row whatever the scene size.
    rows = reader.chunks[-2]
    for row in range(0, shape[-2], rows):
        box = tuple(slice(0, n) for n in shape[:-2]) + (slice(row, min(row + rows, shape[-2])), slice(0, shape[-1]))
        try:
            reader.read(box)
        except (OSError, RuntimeError, ValueError) as error:
            return f"{name} chunk unreadable: {error}"
    return None


def scene_problem(path: Path, scene: str, record: tuple[list[int], str] | None, spec_bands: int) -> str | None:
    """Return what is wrong with scene ``scene`` of the store at ``path``, or None if it is intact.

    Args:
        path: the store directory.
        scene: the scene id.
        record: the root's ``(image shape, dtype)`` of the scene, or None if the root does not list it.
        spec_bands: the band count of the store's dataset spec.
    """
    try:
        attrs = dict(zarr.open_group(str(path / scene), mode="r").attrs).get(ATTR_KEY, {})
    except Exception:
        return "scene group metadata missing or unreadable"
    if not attrs.get("complete"):
        return "not marked complete (rerun ingest with its files to redo it)"
    if record is None:
        return "complete on disk but missing from the store's scene list (rerun ingest to register it)"
    shape, dtype = record
    if shape[0] != spec_bands:
        return f"has {shape[0]} bands, the store's dataset has {spec_bands}"
    all_chunks = bool(attrs.get("all_chunks_written"))
    return (_array_problem(path / scene / "image", shape, dtype, all_chunks)
            or _array_problem(path / scene / "label", shape[1:], "uint8", all_chunks))


def check_store(path: str | Path) -> tuple[list[str], list[str]]:
    """Verify every scene of the store at ``path`` (reads every chunk).

    Returns:
        ``(intact scene ids, one line per damaged scene "<scene>: <problem>")``; scene
        directories that the root does not list are checked too.

    Raises:
        StoreError: not a tile store (see ``TileStore.open``).
    """
    store = TileStore.open(path)
    records = {scene: (list(store.shape(scene)), str(store.dtype(scene))) for scene in store.scenes()}
    on_disk = {p.name for p in store.path.iterdir()
               if p.is_dir() and p.name != PARTIAL_DIR and not p.name.startswith(".")}
    intact, damaged = [], []
    for scene in sorted(set(records) | on_disk):
        problem = scene_problem(store.path, scene, records.get(scene), store.spec.num_bands)
        if problem is None:
            intact.append(scene)
        else:
            damaged.append(f"{scene}: {problem}")
    return intact, damaged
