"""Saved-tensor hooks that count (and optionally offload to the host) what autograd saves."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor

from lrss_ds.memory.device_sim import active_simulator
from lrss_ds.memory.ledger import SavedTensorLedger


def _storage_bytes(t: Tensor) -> tuple[int, int]:
    """``(data_ptr, nbytes)`` of the storage behind ``t`` (what holding ``t`` really keeps)."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _Held:
    """A saved tensor plus its ledger token; the token is released when autograd drops it."""

    __slots__ = ("tensor", "device", "ledger", "token", "__weakref__")

    def __init__(self, tensor: Tensor, device: torch.device | None, ledger: SavedTensorLedger | None, token: Any):
        self.tensor = tensor
        self.device = device  # where to bring it back to; None = leave where it is
        self.ledger = ledger
        self.token = token

    def __del__(self) -> None:
        if self.ledger is not None:
            self.ledger.release(self.token)


def _in_backward() -> bool:
    """True while the autograd engine runs a backward (e.g. a reentrant recomputation)."""
    return torch._C._current_graph_task_id() != -1


class SavedTensorHooks:
    """Pack/unpack hooks: count saved tensors in a ledger and optionally offload them.

    Parameters (leaf tensors that require grad, and views of them) are passed through
    untouched and uncounted: they live anyway. Tensors saved during a backward (the recomputation of a reentrant
    checkpoint) are kept where they are: they are consumed right away, so moving them would
    only cost copies.

    Offloading copies an accelerator tensor into pinned host memory with a non-blocking copy
    and brings it back with a non-blocking copy when backward unpacks it; both copies are on
    the current stream, so they are ordered with the kernels that produce and consume them. A
    tensor already in host memory (always the case on the CPU accelerator) is not copied, but
    is counted as offloaded so the ledger shows what an accelerator run would move; under a
    :class:`lrss_ds.memory.device_sim.DeviceMemorySimulator` it is copied (counted as host) and
    copied back when unpacked (counted as device), as an accelerator run does.

    Args:
        ledger: where to count bytes; ``None`` = do not count.
        offload: move saved tensors to the host.
    """

    def __init__(self, ledger: SavedTensorLedger | None, offload: bool) -> None:
        self.ledger = ledger
        self.offload = offload

    def pack(self, tensor: Tensor) -> Any:
        """Called by autograd when it saves ``tensor`` for backward."""
        base = tensor._base if tensor._base is not None else tensor
        if base.is_leaf and base.requires_grad:  # a parameter or a view of one (weight.t())
            return tensor
        offload = self.offload and not _in_backward()
        simulator = active_simulator() if offload and tensor.device.type == "cpu" else None
        if simulator is None and (not offload or tensor.device.type == "cpu"):
            token = None
            if self.ledger is not None:
                ptr, nbytes = _storage_bytes(tensor)
                token = self.ledger.hold((str(tensor.device), ptr), nbytes, offloaded=offload)
            return _Held(tensor, None, self.ledger, token)
        if simulator is not None:  # simulating an accelerator on the CPU: its host copy, counted as host
            host = simulator.copy_to_host(tensor)
        else:
            host = torch.empty_like(tensor, device="cpu", pin_memory=True)  # keeps channels_last strides
            host.copy_(tensor, non_blocking=True)
        token = None
        if self.ledger is not None:
            ptr, nbytes = _storage_bytes(host)
            token = self.ledger.hold(("cpu", ptr), nbytes, offloaded=True)
        return _Held(host, tensor.device, self.ledger, token)

    @staticmethod
    def unpack(held: Any) -> Tensor:
        """Called by autograd when backward needs the saved tensor."""
        if isinstance(held, Tensor):
            return held
        if held.device is None:
            return held.tensor
        if held.tensor.device == held.device:  # a simulated host copy: the accelerator's copy back
            return held.tensor.clone()
        return held.tensor.to(held.device, non_blocking=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Context in which autograd uses these hooks for every saved tensor."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield
