"""SceneSamples: a torch Dataset of whole scenes or random patches from a tile store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lrss_ds.data.augment import dihedral, shape_preserving
from lrss_ds.data.store import TileStore
from lrss_ds.errors import ConfigError


class SceneSamples(Dataset):
    """Whole scenes or fixed-size patches of one split of a tile store.

    The store is opened lazily in the process that reads (each DataLoader worker opens its own;
    nothing opened before a ``fork`` is reused after it). Patch positions are a pure function
    of ``(seed, epoch, scene, k)``: every worker and every rank draws the same positions, and
    ``set_epoch(e)`` moves to the next draw (with ``persistent_workers=True`` the workers keep
    their own copy, so recreate the DataLoader iterator or leave persistence off).

    Args:
        store_path: the tile store directory.
        split: split name, or None for all scenes.
        mode: ``"whole"`` (one item per scene) or ``"patch"`` (``patches_per_scene`` items per
            scene, each a ``patch_size`` square, clipped to the scene when it is smaller).
        patch_size: patch side in pixels.
        patches_per_scene: patches per scene per epoch.
        seed: seed of the patch positions.

    Items are dicts: ``image`` Tensor (C, H, W) in the store's native dtype (uint8 stays uint8;
    normalisation is the model's job), ``label`` uint8 Tensor (H, W), ``scene`` str, ``window``
    ``(row, col, height, width)``, ``transform`` the augmentation applied (0: none). An item is
    asked for by its index, or by ``(index, transform)`` to get it flipped/turned by
    ``lrss_ds.data.augment.dihedral`` (image and label alike; a non-square sample keeps its shape,
    see that module); the training sample order asks that way when ``train.augment`` is ``d4``.

    Raises:
        ConfigError: bad mode or sizes.
        StoreError: missing store or split.
    """

    def __init__(
        self,
        store_path: str | Path,
        split: str | None,
        mode: str = "whole",
        patch_size: int = 512,
        patches_per_scene: int = 8,
        seed: int = 0,
    ) -> None:
        if mode not in ("whole", "patch"):
            raise ConfigError("mode", f"must be 'whole' or 'patch', not {mode!r}")
        if patch_size < 1 or patches_per_scene < 1:
            raise ConfigError("patch_size", "patch_size and patches_per_scene must be positive")
        self.store_path = Path(store_path)
        self.split = split
        self.mode = mode
        self.patch_size = int(patch_size)
        self.patches_per_scene = int(patches_per_scene)
        self.seed = int(seed)
        self.epoch = 0
        # Metadata only (scene ids and shapes, from the root attributes); arrays are not opened
        # here so the object is cheap to pickle into workers.
        store = TileStore.open(self.store_path)
        self.scenes: list[str] = store.scenes(split)
        self.shapes: list[tuple[int, int, int]] = [store.shape(s) for s in self.scenes]
        self.spec = store.spec
        self._store: TileStore | None = None
        self._pid: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the patch positions of ``epoch`` (call before each epoch, in every process)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_scene = 1 if self.mode == "whole" else self.patches_per_scene
        return len(self.scenes) * per_scene

    def window(self, index: int) -> tuple[int, tuple[int, int, int, int]]:
        """Return ``(scene number, (row, col, height, width))`` of item ``index`` this epoch."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.mode == "whole":
            _, height, width = self.shapes[index]
            return index, (0, 0, height, width)
        scene_no, k = divmod(index, self.patches_per_scene)
        _, height, width = self.shapes[scene_no]
        ph, pw = min(self.patch_size, height), min(self.patch_size, width)
        rng = np.random.default_rng([self.seed, self.epoch, scene_no, k])
        row = int(rng.integers(0, height - ph + 1))
        col = int(rng.integers(0, width - pw + 1))
        return scene_no, (row, col, ph, pw)

    def _open(self) -> TileStore:
        # Reopen after a fork: Zarr/asyncio state must not cross process boundaries.
        if self._store is None or self._pid != os.getpid():
            self._store = TileStore.open(self.store_path)
            self._pid = os.getpid()
        return self._store

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, transform = key if isinstance(key, tuple) else (key, 0)
        scene_no, window = self.window(index)
        scene = self.scenes[scene_no]
        image, label = self._open().read(scene, window)
        if transform:
            transform = shape_preserving(transform, window[2], window[3])
            image, label = dihedral(image, label, transform)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)),
            "label": torch.from_numpy(np.ascontiguousarray(label)),
            "scene": scene,
            "window": window,
            "transform": transform,
        }

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # never ship open arrays to workers
        state["_pid"] = None
        return state
