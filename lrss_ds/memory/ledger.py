"""A ledger of the bytes autograd keeps for backward: on the device and offloaded to the host."""

from __future__ import annotations

import threading
from typing import Hashable

from lrss_ds.units import GIB


class SavedTensorLedger:
    """Count the bytes of saved activations kept on the device and offloaded, current and peak.

    The saved-tensor hooks of :func:`lrss_ds.memory.apply_memory_mode` call :meth:`hold` when
    autograd saves a tensor and :meth:`release` when autograd frees it. Storage is counted
    once however many ops save it (or a view of it): the key is the storage, and the bytes
    are the storage's size, which is what memory actually holds. Parameters are not counted
    (they live anyway). Releases may come from autograd worker threads, hence the lock.

    Attributes:
        device_bytes / offloaded_bytes: bytes held now.
        peak_device_bytes / peak_offloaded_bytes / peak_total_bytes: maxima since
            :meth:`reset_peaks`.
        saved_count: number of saves seen since :meth:`reset_peaks` (duplicates included).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: dict[Hashable, list[int]] = {}  # key -> [hold count, bytes]
        self.device_bytes = 0
        self.offloaded_bytes = 0
        self.peak_device_bytes = 0
        self.peak_offloaded_bytes = 0
        self.peak_total_bytes = 0
        self.saved_count = 0

    def hold(self, key: Hashable, nbytes: int, offloaded: bool) -> tuple[Hashable, bool]:
        """Record one save of the storage ``key`` of ``nbytes`` bytes.

        Args:
            key: identifies the storage (e.g. ``(device, data_ptr)``); a key already held is
                not counted again.
            nbytes: the storage's size in bytes.
            offloaded: True if the storage is in host memory because of offloading.

        Returns:
            the token to pass to :meth:`release`.
        """
        token = (key, offloaded)
        with self._lock:
            self.saved_count += 1
            entry = self._holds.get(token)
            if entry is not None:
                entry[0] += 1
                return token
            self._holds[token] = [1, int(nbytes)]
            if offloaded:
                self.offloaded_bytes += int(nbytes)
            else:
                self.device_bytes += int(nbytes)
            self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
            self.peak_offloaded_bytes = max(self.peak_offloaded_bytes, self.offloaded_bytes)
            self.peak_total_bytes = max(self.peak_total_bytes, self.device_bytes + self.offloaded_bytes)
        return token

    def release(self, token: tuple[Hashable, bool]) -> None:
        """Undo one :meth:`hold`; the bytes go when the last save of the storage is freed.

        Args:
            token: what :meth:`hold` returned.
        """
        with self._lock:
            entry = self._holds.get(token)
            if entry is None:  # already gone (e.g. after clear())
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del self._holds[token]
            if token[1]:
                self.offloaded_bytes -= entry[1]
            else:
                self.device_bytes -= entry[1]

    def reset_peaks(self) -> None:
        """Start new peaks from the current values (call once per step)."""
        with self._lock:
            self.peak_device_bytes = self.device_bytes
            self.peak_offloaded_bytes = self.offloaded_bytes
            self.peak_total_bytes = self.device_bytes + self.offloaded_bytes
            self.saved_count = 0

    def snapshot(self) -> dict[str, int]:
        """Current and peak counts as a plain dict (for logs and JSON).

        Returns:
            ``device_bytes``, ``offloaded_bytes``, ``peak_device_bytes``,
            ``peak_offloaded_bytes``, ``peak_total_bytes``, ``saved_count``.
        """
        with self._lock:
            return {
                "device_bytes": self.device_bytes,
                "offloaded_bytes": self.offloaded_bytes,
                "peak_device_bytes": self.peak_device_bytes,
                "peak_offloaded_bytes": self.peak_offloaded_bytes,
                "peak_total_bytes": self.peak_total_bytes,
                "saved_count": self.saved_count,
            }

    def summary(self) -> str:
        """One short line for a progress bar or log, e.g. ``"saved dev 1.20G (pk 2.31G) host 0.00G"``."""
        s = self.snapshot()
        return (
            f"saved dev {s['device_bytes'] / GIB:.2f}G (pk {s['peak_device_bytes'] / GIB:.2f}G) "
            f"host {s['offloaded_bytes'] / GIB:.2f}G (pk {s['peak_offloaded_bytes'] / GIB:.2f}G)"
        )
