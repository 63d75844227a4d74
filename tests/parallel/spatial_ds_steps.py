"""Spatial training steps under DeepSpeed: ZeRO-2 reduces the band gradients over DeepSpeed's own
sequence-parallel groups (``mpu`` = :class:`SpatialTopology`).

Run under the launcher: ``python -m tests.parallel.spatial_ds_steps --case JSON --steps N --out DIR``
(``--offload``: the optimizer on the host, as ``ds_configs/cpu.json``; ``--momentum``, ``--clip``:
SGD momentum and ``gradient_clipping``); each rank writes its parameters after the steps, the
losses and DeepSpeed's global gradient norm of each step to ``DIR/rank<r>.pt``.
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


def one_rank_steps(case: Case, steps: int, momentum: float = 0.0, clip: float = CLIP) -> dict[str, Any]:
    """The same steps on one rank with the whole scene (SGD with the gradient norm clipped, the reference).

    Returns:
        ``params`` after the steps, ``losses`` and ``norms`` (the unclipped gradient norm) of each step.
    """
    model = build(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    image, label = scene(case)
    losses, norms = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(case)(model(image), label)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))))
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "losses": losses, "norms": norms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--zero", type=int, default=2, help="ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="offload the optimizer to the host")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    parser.add_argument("--clip", type=float, default=CLIP, help="gradient_clipping (0: none)")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(verbose=False)
    case = Case(**json.loads(args.case))
    spatial = dist.get_world_size()
    zero: dict[str, Any] = {"stage": args.zero}
    if args.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": args.clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "sequence_parallel_size": spatial,
    }
    # one rank runs as the trainer runs it: no mpu (DeepSpeed then has no sequence-parallel group)
    topology = SpatialTopology(spatial)
    model = build(case)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=args.momentum)
    mpu = topology if spatial > 1 else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    group_handle = engine.seq_parallel_group if spatial > 1 else topology.spatial_group
    group = SpatialGroup(comm, dist.get_rank(group_handle), spatial, group_handle)
    spatialize(engine.module, group)
    image, label = scene(case)
    start, stop = band_bounds(case.height, spatial, engine.module.pad_multiple)[group.rank]
    losses, norms, first_grads = [], [], {}
    for step in range(args.steps):
        share = SpatialLoss(loss_fn(case), group)(engine(image[..., start:stop, :]), label[:, start:stop])
        engine.backward(share)
        if step == 0 and args.zero == 0:
            first_grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
        engine.step()
        losses.append(float(comm.all_reduce(share.detach(), group=group_handle)))
        norm = engine.get_global_grad_norm()
        norms.append(float(norm) if norm is not None else float("nan"))
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save(
        {"params": params, "losses": losses, "norms": norms, "grads": first_grads},
        args.out / f"rank{dist.get_rank()}.pt",
    )


if __name__ == "__main__":
    main()
