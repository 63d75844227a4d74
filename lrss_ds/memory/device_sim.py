"""Simulate an accelerator's allocated memory on the CPU: live storages, device or host, and their peak.

:class:`DeviceMemorySimulator` is a ``TorchDispatchMode`` that sees every tensor an operation
returns while it is entered, follows each untyped storage with a weak reference (so a storage
is counted once however many views share it, and leaves the total when it is freed) and
classifies it by where the configured run would keep it on a GPU node:

* **host** — a storage allocated inside :meth:`DeviceMemorySimulator.on_host` (the optimizer
  step of a ZeRO-Offload engine; the host copies the saved-tensor offload hooks of
  :mod:`lrss_ds.memory.offload` make through :meth:`DeviceMemorySimulator.copy_to_host`), and
  the engine state known by object identity to live on the host: the offloaded optimizer's
  fp32 partitions, their gradients and the optimizer states (ZeRO-1/2 ``cpu_offload``, ZeRO-3
  ``offload_optimizer``), and ZeRO-3's parameter partitions under ``offload_param``;
* **device** — everything else: parameters and gradients, ZeRO's flat buffers and partitions
  when not offloaded, activations, saved tensors not offloaded, the copies the offload hooks
  bring back for backward, the loss's temporaries, and tensors that existed before the
  simulation and an operation uses (the input batch, BatchNorm buffers). On the CPU
  accelerator ``batch.to(engine.device)`` returns the loader's tensor itself: it is counted
  once, on the device (the copy a GPU run makes); the loader's pinned host buffer is not counted.

Its peak of device bytes (:attr:`DeviceMemorySimulator.peak_device_bytes`) is the **simulated
device peak**, the counterpart of ``torch.cuda.max_memory_allocated``. It counts exactly the
bytes of tensor storages (no rounding to the CUDA allocator's 512-byte blocks). What it cannot
see, and what a card therefore has to hold on top of it (see :func:`device_bytes_needed`):

* the CUDA context and the loaded kernels (cuDNN, cuBLAS, NCCL), outside the allocator;
* the caching allocator's fragmentation (``max_memory_reserved`` over ``max_memory_allocated``);
* workspaces cuDNN/cuBLAS take from the allocator for a convolution or GEMM algorithm, and
  NCCL's communication buffers — on CPU these kernels do not exist;
* buffers DeepSpeed's ``cpu_checkpointing`` moves to the host: on the CPU accelerator DeepSpeed
  does not move them (:func:`lrss_ds.memory.activation_checkpointing.configure_deepspeed_checkpointing`), so
  the checkpointed segments' inputs stay counted on the device (an over-estimate by at most the
  ledger's offloaded checkpoint-input bytes);
* storages shrunk in place by ``UntypedStorage.resize_`` outside any operation (ZeRO-3's
  parameter release) keep their size until an operation returns a tensor on them again;
* device storages that no operation touches while the simulation is entered, unless given to
  :meth:`DeviceMemorySimulator.track` (the engine's parameters and ZeRO buffers are).

The host side is one counter for the whole simulator, not per thread: :meth:`on_host` must not
be entered by one thread while another allocates device tensors (the CPU autograd engine runs
backward on the calling thread, and DeepSpeed's optimizer step runs on it as well).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from lrss_ds.units import GIB

# What a card holds beyond the simulated peak. The CUDA context with cuDNN/cuBLAS loaded takes
# 0.3-0.6 GiB outside the allocator, NCCL's buffers for one communicator up to ~0.5 GiB, and
# cuDNN's convolution workspaces (taken from the allocator, so in max_memory_allocated on a GPU,
# invisible here) are capped by PyTorch at the free memory but stay below ~0.5 GiB for the
# benchmark-free algorithm choice; 1.5 GiB covers the three. The caching allocator's reserve
# over its allocated bytes is commonly 5-20% on convolutional training; 15% is assumed.
DEVICE_FIXED_MARGIN_BYTES: int = int(1.5 * GIB)
DEVICE_FRAGMENTATION_FRACTION: float = 0.15


def device_bytes_needed(simulated_peak_bytes: float) -> float:
    """Card memory a run needs whose simulated device peak is ``simulated_peak_bytes``.

    ``peak * (1 + DEVICE_FRAGMENTATION_FRACTION) + DEVICE_FIXED_MARGIN_BYTES``: the allocator's
    reserve over what it hands out, plus the CUDA context, NCCL buffers and cuDNN workspaces.

    Args:
        simulated_peak_bytes: the simulated (or measured ``max_memory_allocated``) peak.

    Returns:
        bytes of card memory.
    """
    return simulated_peak_bytes * (1.0 + DEVICE_FRAGMENTATION_FRACTION) + DEVICE_FIXED_MARGIN_BYTES


def allocator_budget(card_bytes: float) -> float:
    """The largest simulated device peak a card of ``card_bytes`` holds (inverse of :func:`device_bytes_needed`).

    Args:
        card_bytes: the card's memory.

    Returns:
        bytes (0 when the fixed margin alone does not fit).
    """
    return max(0.0, (card_bytes - DEVICE_FIXED_MARGIN_BYTES) / (1.0 + DEVICE_FRAGMENTATION_FRACTION))


def margin_text() -> str:
    """The assumed margin in words, for reports and the planner's output."""
    return (
        f"card memory needed = simulated peak x {1 + DEVICE_FRAGMENTATION_FRACTION:.2f} (allocator reserve) + "
        f"{DEVICE_FIXED_MARGIN_BYTES / GIB:.1f} GiB (CUDA context, NCCL buffers, cuDNN workspaces)"
    )


class _Entry:
    """One followed storage: its size, its side and whether it was allocated while simulating."""

    __slots__ = ("ref", "nbytes", "host", "new")

    def __init__(self, ref: weakref.ref, nbytes: int, host: bool, new: bool) -> None:
        self.ref = ref
        self.nbytes = nbytes
        self.host = host
        self.new = new


def _storages(value: Any) -> list[torch.UntypedStorage]:
    """The untyped storages of the tensors in ``value`` (any nesting); none for storage-less tensors."""
    out = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, Tensor):
            try:
                out.append(leaf.untyped_storage())
            except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
                continue
    return out


class DeviceMemorySimulator(TorchDispatchMode):
    """Count live tensor storages as a GPU run would place them, and the peak of the device side.

    Use it around a training step (it can be entered again for every step; the counts and
    peaks carry over, :meth:`reset_peaks` starts new peaks)::

        sim = DeviceMemorySimulator(engine)
        with sim:
            loss = loss_fn(engine(image), label)
            engine.backward(loss)
            engine.step()
        sim.peak_device_bytes      # the simulated device peak

    Args:
        engine: a DeepSpeed engine (or ``None``). Its module's parameters, buffers and
            gradients and every tensor the ZeRO optimizer keeps are followed from the start,
            each on the side its configuration puts it (see the module docstring); with an
            offloaded optimizer, its step runs under :meth:`on_host`.

    Attributes:
        device_bytes / host_bytes: bytes of followed storages now, per side.
        new_bytes: bytes now of storages allocated while the simulation was entered (both
            sides): with nothing offloaded, what the process's resident set grew by.
        peak_device_bytes / peak_host_bytes / peak_new_bytes: maxima since creation or
            :meth:`reset_peaks`.
    """

    def __init__(self, engine: Any = None) -> None:
        super().__init__()
        self.engine = engine
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._host_depth = 0
        self._hook_handles: list[Any] = []
        self.device_bytes = 0
        self.host_bytes = 0
        self.new_bytes = 0
        self.peak_device_bytes = 0
        self.peak_host_bytes = 0
        self.peak_new_bytes = 0

    # --- counting -------------------------------------------------------------------------

    def _freed(self, key: int, ref: weakref.ref) -> None:
        """Weak-reference callback: the storage ``key`` was freed (any thread)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.ref is not ref:
                return
            del self._entries[key]
            self._add(entry, -entry.nbytes)

    def _add(self, entry: _Entry, delta: int) -> None:
        """Change the counters by ``delta`` bytes of ``entry`` (lock held) and update the peaks."""
        if entry.host:
            self.host_bytes += delta
            self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        else:
            self.device_bytes += delta
            self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)
        if entry.new:
            self.new_bytes += delta
            self.peak_new_bytes = max(self.peak_new_bytes, self.new_bytes)

    def _follow(self, storage: torch.UntypedStorage, host: bool, new: bool, reclassify: bool = False) -> None:
        """Start following ``storage`` (or update its size; with ``reclassify``, also its side)."""
        nbytes = storage.nbytes()
        key = id(storage)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.ref() is storage:
                if entry.nbytes != nbytes:  # resized in place (resize_, set_)
                    self._add(entry, nbytes - entry.nbytes)
                    entry.nbytes = nbytes
                if reclassify and entry.host != host:
                    self._add(entry, -entry.nbytes)
                    entry.host = host
                    self._add(entry, entry.nbytes)
                return
            if entry is not None:  # a freed storage whose id was reused before its callback ran
                del self._entries[key]
                self._add(entry, -entry.nbytes)
            if storage.device.type == "meta":
                return
            ref = weakref.ref(storage, lambda r, k=key: self._freed(k, r))
            entry = _Entry(ref, nbytes, host, new)
            self._entries[key] = entry
            self._add(entry, nbytes)

    def track(self, tensors: Iterable[Any], host: bool = False) -> None:
        """Follow the storages of already existing ``tensors`` on the given side.

        A storage already followed is moved to that side (how the engine's offloaded
        optimizer state is named host after an operation used it).

        Args:
            tensors: tensors (``None`` and non-tensors are skipped).
            host: the side.
        """
        for storage in _storages(list(tensors)):
            self._follow(storage, host, new=False, reclassify=True)

    def reset_peaks(self) -> None:
        """Start new peaks from the current counts (e.g. per phase or per step)."""
        with self._lock:
            self.peak_device_bytes = self.device_bytes
            self.peak_host_bytes = self.host_bytes
            self.peak_new_bytes = self.new_bytes

    def snapshot(self) -> dict[str, int]:
        """Current and peak counts as a plain dict (for logs and JSON)."""
        with self._lock:
            return {
                "device_bytes": self.device_bytes,
                "host_bytes": self.host_bytes,
                "new_bytes": self.new_bytes,
                "peak_device_bytes": self.peak_device_bytes,
                "peak_host_bytes": self.peak_host_bytes,
                "peak_new_bytes": self.peak_new_bytes,
            }

    # --- placement ------------------------------------------------------------------------

    @contextlib.contextmanager
    def on_host(self) -> Iterator[None]:
        """Context whose new allocations are host-side (what a GPU run does on the CPU)."""
        self._host_depth += 1
        try:
            yield
        finally:
            self._host_depth -= 1

    def copy_to_host(self, tensor: Tensor) -> Tensor:
        """A host-side copy of ``tensor``, as an accelerator run's offload makes (same strides).

        Args:
            tensor: the tensor to offload.

        Returns:
            the copy, counted on the host.
        """
        with self.on_host():
            host = torch.empty_like(tensor, device="cpu")
            host.copy_(tensor)
        return host

    # --- the engine -----------------------------------------------------------------------

    def _track_engine(self) -> None:
        """Follow the engine's module and ZeRO state on their sides; time the offloaded step as host."""
        engine = self.engine
        module = getattr(engine, "module", engine)
        self.track(list(module.parameters()) + [p.grad for p in module.parameters()] + list(module.buffers()))
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is None:
            return
        host = _host_state(optimizer)
        host_ids = {id(s) for s in _storages(host)}
        device = [t for t in _tensors_of(optimizer) if not any(id(s) in host_ids for s in _storages(t))]
        self.track(device, host=False)
        self.track(host, host=True)
        if _optimizer_offloaded(optimizer):
            inner = getattr(optimizer, "optimizer", optimizer)
            if hasattr(inner, "register_step_pre_hook"):
                self._hook_handles = [
                    inner.register_step_pre_hook(lambda *a: self._enter_host()),
                    inner.register_step_post_hook(lambda *a: self._leave_host()),
                ]

    def _enter_host(self) -> None:
        self._host_depth += 1

    def _leave_host(self) -> None:
        self._host_depth = max(0, self._host_depth - 1)

    def __enter__(self) -> DeviceMemorySimulator:
        if self.engine is not None:
            self._track_engine()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._host_depth = 0
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = _storages((args, kwargs))
        result = func(*args, **kwargs)
        # Inputs not followed yet existed before the simulation (the batch, BatchNorm buffers):
        # on a GPU run they live on the device too.
        for storage in inputs:
            self._follow(storage, host=False, new=False)
        input_ids = {id(s) for s in inputs}
        host = self._host_depth > 0
        for storage in _storages(result):
            # an output on an input's storage is a view or an in-place result, not an allocation
            self._follow(storage, host=host, new=id(storage) not in input_ids)
        return result


def _optimizer_offloaded(optimizer: Any) -> bool:
    """True when a ZeRO optimizer keeps its fp32 state and step on the host."""
    return bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))


def _host_state(optimizer: Any) -> list[Tensor]:
    """The tensors a ZeRO optimizer keeps on the host under its offload settings (by identity)."""
    host: list[Tensor] = []
    if _optimizer_offloaded(optimizer):
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for partition in getattr(optimizer, name, None) or []:
                host += [partition, partition.grad]
        inner = getattr(optimizer, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            host += [v for v in state.values() if isinstance(v, Tensor)]
        host += list((getattr(optimizer, "accumulated_grads_in_cpu", None) or {}).values())
    if getattr(optimizer, "offload_param", False):
        for group in getattr(optimizer, "fp16_groups", None) or []:
            host += [getattr(p, "ds_tensor", None) for p in group]
    return [t for t in host if isinstance(t, Tensor)]


def _tensors_of(optimizer: Any) -> list[Tensor]:
    """Every tensor an optimizer (ZeRO wrapper or torch) holds in its attributes, two levels deep,
    and its inner optimizer's state."""
    found: list[Tensor] = []
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict):
            found += [v for v in state.values() if isinstance(v, Tensor)]
    for value in vars(optimizer).values():
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple, dict)):
            for item in value.values() if isinstance(value, dict) else value:
                if isinstance(item, Tensor):
                    found.append(item)
                elif isinstance(item, (list, tuple)):
                    found += [t for t in item if isinstance(t, Tensor)]
    return found


def active_simulator() -> DeviceMemorySimulator | None:
    """The innermost entered :class:`DeviceMemorySimulator` of this thread, or ``None``.

    The saved-tensor offload hooks ask this to make the host copy a GPU run makes. (Reads
    torch's dispatch-mode stack through ``torch.utils._python_dispatch``'s private accessor:
    torch has no public one in 2.13.)
    """
    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, DeviceMemorySimulator):
            return mode
    return None


def simulating(simulator: DeviceMemorySimulator | None) -> contextlib.AbstractContextManager:
    """``simulator`` itself as a context, or a no-op context when there is none.

    Args:
        simulator: the simulator, or ``None`` when the run does not simulate.

    Returns:
        a context manager.
    """
    return contextlib.nullcontext() if simulator is None else simulator


def simulated_summary(simulator: DeviceMemorySimulator | None) -> dict[str, float]:
    """Peak simulated device and host bytes (GiB) for logs and ``metrics.json``; empty without a simulator."""
    if simulator is None:
        return {}
    return {
        "simulated_device_peak_gib": simulator.peak_device_bytes / GIB,
        "simulated_host_peak_gib": simulator.peak_host_bytes / GIB,
    }
