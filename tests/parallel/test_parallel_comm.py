"""The halo exchange's point-to-point transfers run on the accelerator's device, through engine/comm."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lrss_ds.engine import comm
from tests.engine.test_engine_devices import Reached, StandInAccelerator


class RecordingP2P:
    """Stands in for ``batch_isend_irecv`` of a group whose backend serves ``device`` only (as nccl)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.calls: list[tuple[str, int, str]] = []

    def __call__(self, ops: list[Any]) -> None:
        for op in ops:
            self.calls.append((op.op.__name__, op.group_peer, op.tensor.device.type))
            if op.tensor.device.type != self.device:
                raise RuntimeError(f"No backend type associated with device type {op.tensor.device.type}")
        raise Reached("batch_isend_irecv")


def test_exchange_sends_and_receives_on_the_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.accelerator

    recorder = RecordingP2P("meta")
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: StandInAccelerator("meta"))
    monkeypatch.setattr(dist, "batch_isend_irecv", recorder)
    # the real P2POp resolves its peer in the default process group, which this process has not opened
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, group=None, group_peer=None: SimpleNamespace(
        op=op, tensor=tensor, group=group, group_peer=group_peer))
    host = torch.zeros(1, 2, 3, 4)
    with pytest.raises(Reached):
        comm.exchange({1: host[:, :, :1]}, {2: (1, 2, 2, 4)}, like=host)
    assert recorder.calls == [("isend", 1, "meta"), ("irecv", 2, "meta")]


def test_an_exchange_with_nothing_to_move_communicates_nothing() -> None:
    assert comm.exchange({}, {}, like=torch.zeros(1)) == {}
