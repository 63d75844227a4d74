"""Collectives between ranks, each on tensors placed on the device the communication backend serves.

DeepSpeed opens the process group of its accelerator: ``nccl`` on CUDA, which serves only CUDA
tensors ("No backend type associated with device type cpu" for a host tensor), and gloo/ccl on
the CPU accelerator. Every collective of ``lrss_ds`` goes through this module, which puts its
tensors on :func:`collective_device` at the moment of the call. Without a process group of more
than one rank there is nothing to communicate, and each function returns this rank's value as is.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """The device whose tensors the job's process group takes: the accelerator's current device.

    Asked of ``deepspeed.accelerator.get_accelerator()`` at each call (``cuda:<local rank>``
    once DeepSpeed has set the device, ``cpu`` on the CPU accelerator).
    """
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (the world by default); 1 without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def all_reduce(tensor: torch.Tensor, op: Any = None, group: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` over the ranks of ``group``; return the result on ``tensor``'s device.

    The tensor is copied to :func:`collective_device` for the reduction (no copy when it is
    there already) and the result copied back.

    Args:
        tensor: this rank's values, on any device.
        op: a ``torch.distributed.ReduceOp`` (default: SUM).
        group: process group (default: the world).

    Returns:
        The reduced values (``tensor`` itself without a process group of more than one rank).
    """
    if world_size(group) == 1:
        return tensor
    buffer = tensor.to(collective_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return buffer.to(tensor.device)


def exchange(
    sends: Mapping[int, torch.Tensor],
    receives: Mapping[int, Sequence[int]],
    like: torch.Tensor,
    group: Any = None,
) -> dict[int, torch.Tensor]:
    """Point-to-point: send each ``sends[peer]`` to ``peer`` and receive ``receives[peer]``-shaped tensors.

    Only the ranks named take part (not a collective over ``group``); every send must meet a
    receive of the same shape on its peer. All transfers of one call run at once
    (``batch_isend_irecv``), so two ranks that send to each other do not wait on each other.

    Args:
        sends: ``{group rank: tensor}`` to send (any device; sent from :func:`collective_device`).
        receives: ``{group rank: shape}`` to receive.
        like: the received tensors take its dtype and device.
        group: process group (default: the world); peers are ranks within it.

    Returns:
        ``{group rank: received tensor}`` on ``like``'s device.
    """
    if not sends and not receives:
        return {}
    device = collective_device()
    outgoing = {peer: tensor.to(device).contiguous() for peer, tensor in sends.items()}
    incoming = {peer: torch.empty(tuple(shape), dtype=like.dtype, device=device) for peer, shape in receives.items()}
    ops = [dist.P2POp(dist.isend, t, group=group, group_peer=peer) for peer, t in outgoing.items()]
    ops += [dist.P2POp(dist.irecv, t, group=group, group_peer=peer) for peer, t in incoming.items()]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return {peer: t.to(like.device) for peer, t in incoming.items()}


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (a collective: every rank must call it)."""
    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device())
    return bool(all_reduce(value, op=dist.ReduceOp.MAX).item())


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's ``data`` (equal length on every rank), in rank order (a collective).

    A byte tensor on :func:`collective_device` rather than ``all_gather_object``, which picks its
    device itself (``torch.cuda.current_device()`` under nccl, right only once the device is set).
    """
    if world_size() == 1:
        return [data]
    mine = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(collective_device())
    gathered = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(gathered, mine)
    return [bytes(part.cpu().tolist()) for part in gathered]


def barrier() -> None:
    """Wait for every rank (a no-op in a process without torch.distributed).

    Carries no tensor of ours: under nccl torch takes the device DeepSpeed bound the group to
    (``init_process_group(device_id=...)``), on gloo the host.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
