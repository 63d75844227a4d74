"""BatchNorm recalibration: recompute running statistics with the final weights ("precise BN").

Why: with one scene per step and AdamW at 1e-3 the weights move fast, and BatchNorm's
exponential running averages (momentum 0.1: about the last 10 steps) lag behind them. After a
short training the running variances of EHSNet's deeper layers were 1.5-2.6x below the
statistics of its final weights and in eval mode its lake IoU collapsed (8 % with the running
averages, 75 % with recomputed statistics; 256 px synthetic scenes, 200 steps). Recalibration
resets every BatchNorm's running statistics and replaces them by the plain mean of the
per-batch statistics over a few training batches, forwarded with the final weights, without
gradients, with every other module in eval mode (the path prediction takes) and without
augmentation.

:func:`recalibration` is the mechanism (any model, any batches); :func:`recalibrate_run` is the
trainer's use of it (``train.recalibrate_bn``): every rank forwards its share of the same N
training samples and the statistics are averaged across ranks, weighted by batch counts, so
every rank ends with the same statistics, equal (up to rounding) to one process forwarding all N.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lrss_ds.engine import comm
from lrss_ds.memory.activation_checkpointing import batchnorm_modules, frozen_batchnorm_statistics


def _average_across_ranks(norms: list[_BatchNorm]) -> None:
    """Replace each layer's running statistics by the batch-count-weighted mean over all ranks.

    One all-reduce of a flat float64 tensor through ``lrss_ds.engine.comm`` (on the
    accelerator's current device, as NCCL needs).
    """
    parts = []
    for bn in norms:
        count = bn.num_batches_tracked.to(torch.float64).reshape(1)
        parts += [bn.running_mean.to(torch.float64) * count, bn.running_var.to(torch.float64) * count, count]
    flat = comm.all_reduce(torch.cat(parts), op=dist.ReduceOp.SUM)
    at = 0
    for bn in norms:
        channels = bn.running_mean.numel()
        mean_sum, var_sum = flat[at : at + channels], flat[at + channels : at + 2 * channels]
        total = flat[at + 2 * channels]
        at += 2 * channels + 1
        if total > 0:
            bn.running_mean.copy_((mean_sum / total).to(bn.running_mean))
            bn.running_var.copy_((var_sum / total).to(bn.running_var))
            bn.num_batches_tracked.fill_(int(total.item()))


@contextlib.contextmanager
def recalibration(model: nn.Module, across_ranks: bool = False) -> Iterator[list[_BatchNorm]]:
    """Inside: forwards (under ``torch.no_grad``) recompute the running statistics from scratch.

    On entry every module goes to eval mode except the BatchNorm layers, whose running
    statistics are reset and set to a cumulative average (``momentum=None``). On exit the
    momenta and every module's train/eval mode are put back; with ``across_ranks`` the
    statistics are first averaged over the ranks (a collective: every rank must leave the
    context); a layer no forward reached on any rank (e.g. an auxiliary head, which only
    training forwards run) gets its previous statistics back.

    Args:
        model: the model, or a DeepSpeed engine wrapping it.
        across_ranks: average over the ranks of an initialised process group.

    Yields:
        The BatchNorm layers (to freeze with ``frozen_batchnorm_statistics`` for a forward that
        must not count, e.g. one that only keeps ranks in step).
    """
    norms = batchnorm_modules(model)
    modes = [(module, module.training) for module in model.modules()]
    saved = [
        (bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in norms
    ]
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        yield norms
        if across_ranks and comm.world_size() > 1:
            _average_across_ranks(norms)
        for bn, (_, mean, var, count) in zip(norms, saved):
            if int(bn.num_batches_tracked) == 0:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
    finally:
        for bn, (momentum, *_) in zip(norms, saved):
            bn.momentum = momentum
        for module, training in modes:
            module.training = training


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None) -> int:
    """Recompute ``model``'s BatchNorm running statistics over ``batches`` in this process.

    Args:
        model: the model (modes are set and restored here).
        batches: inputs, e.g. image batches ``(B, C, H, W)``; each is one BatchNorm batch.
        forward: runs one batch (default ``model(batch)``).

    Returns:
        Batches forwarded.
    """
    forward = forward or model
    count = 0
    with recalibration(model):
        for batch in batches:
            forward(batch)
            count += 1
    return count


def recalibration_indices(num_samples: int, count: int, seed: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of the ``count`` training samples that recalibrate the statistics.

    The samples are the first ``count`` of a permutation of the training set drawn from
    ``seed`` (cycled when ``count`` exceeds the set), the same on every rank; rank ``r`` takes
    every ``world_size``-th of them from the ``r``-th on.
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = [order[i % num_samples] for i in range(count)]
    return chosen[rank::world_size]


@torch.no_grad()
def recalibrate_run(run: Any) -> int:
    """``train.recalibrate_bn``: recompute the run's BatchNorm statistics with its current weights.

    Every rank forwards its share of ``train.recalibrate_bn`` training samples (whole scenes or
    patches, as trained, in micro-batches of the training size, not augmented) under the
    evaluation's autocast, then the statistics are averaged across ranks. Ranks with a
    smaller share run extra forwards with frozen statistics, so that every rank makes the same
    number of forwards (ZeRO-3 gathers parameters collectively in each).

    Args:
        run: the trainer's ``Run`` (engine, train_set, memory_mode, config, dist).

    Returns:
        Batches this rank forwarded that counted.
    """
    from lrss_ds.engine.loaders import collate
    from lrss_ds.engine.setup import precision_autocast

    engine = run.engine
    count = run.config.train.recalibrate_bn
    micro = int(engine.train_micro_batch_size_per_gpu())
    world = run.dist.world_size
    mine = recalibration_indices(len(run.train_set), count, run.config.train.seed, run.dist.rank, world)
    batches = [mine[i : i + micro] for i in range(0, len(mine), micro)]
    most = math.ceil(math.ceil(count / world) / micro)  # batches of the rank with the largest share
    padding = most - len(batches)
    filler = batches[0] if batches else [0]

    def forward(indices: list[int]) -> None:
        image = collate([run.train_set[i] for i in indices])["image"].to(engine.device)
        with torch.autocast(engine.device.type, dtype=torch.bfloat16, enabled=run.memory_mode.bf16):
            with precision_autocast(engine):
                engine(image)

    with recalibration(engine, across_ranks=True) as norms:
        for indices in batches:
            forward(indices)
        with frozen_batchnorm_statistics(norms):
            for _ in range(padding):
                forward(filler)
    return len(batches)
