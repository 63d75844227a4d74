"""Spatial training steps under DeepSpeed: ZeRO-2 reduces the band gradients over DeepSpeed's own
sequence-parallel groups (``mpu`` = :class:`SpatialTopology`).

Run under the launcher: ``python -m tests.parallel.spatial_ds_steps --case JSON --steps N --out DIR``;
each rank writes its parameters after the steps and the losses to ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lrss_ds.engine import comm
from lrss_ds.engine.spatial_groups import SpatialTopology
from lrss_ds.parallel import SpatialGroup, SpatialLoss, band_bounds, spatialize
from tests.parallel.spatial_cases import Case, build, loss_fn, scene

LR = 0.05
CLIP = 1.0  # DeepSpeed's default gradient_clipping, stated in both runs


def one_rank_steps(case: Case, steps: int) -> dict[str, Any]:
    """The same steps on one rank with the whole scene (plain SGD with the gradient norm clipped, the reference)."""
    model = build(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    image, label = scene(case)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(case)(model(image), label)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(verbose=False)
    case = Case(**json.loads(args.case))
    spatial = dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": args.zero},
        "zero_allow_untested_optimizer": True,
        "sequence_parallel_size": spatial,
    }
    topology = SpatialTopology(spatial)
    model = build(case)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config, mpu=topology
    )
    group_handle = engine.seq_parallel_group
    group = SpatialGroup(comm, dist.get_rank(group_handle), spatial, group_handle)
    spatialize(engine.module, group)
    image, label = scene(case)
    start, stop = band_bounds(case.height, spatial, engine.module.pad_multiple)[group.rank]
    losses, first_grads = [], {}
    for step in range(args.steps):
        share = SpatialLoss(loss_fn(case), group)(engine(image[..., start:stop, :]), label[:, start:stop])
        engine.backward(share)
        if step == 0 and args.zero == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
        engine.step()
        losses.append(float(comm.all_reduce(share.detach(), group=group_handle)))
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save({"params": params, "losses": losses, "grads": first_grads}, args.out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main()
