"""One rank's part of a spatial-parallel check, and the one-rank reference it is compared with.

Run by the tests in worker processes (``torch.multiprocessing`` with a ``file://`` rendezvous)
or under the ``deepspeed`` launcher (``python -m tests.parallel.spatial_cases --case JSON --out DIR``).
Each rank writes its band's logits, the scene loss, the group-summed parameter gradients and
the BatchNorm running statistics to ``DIR/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lrss_ds.engine import comm
from lrss_ds.memory.activation_checkpointing import TorchCheckpointRunner, batchnorm_modules
from lrss_ds.models.base import SegmentationModel, set_segment_runner
from lrss_ds.models.ehsnet import EHSNet
from lrss_ds.models.hrnet_fcn import HRNetFCN
from lrss_ds.models.losses import build_loss
from lrss_ds.parallel import SpatialGroup, SpatialLoss, band_bounds, spatialize
from lrss_ds.parallel.convert import gradient_sum

CLASSES = 3
IGNORE = 255


@dataclass
class Case:
    """A scene, a model and how to run it."""

    height: int = 80
    width: int = 64
    dtype: str = "float64"
    checkpoint: bool = False
    loss: str = "ce"
    output_stride: int = 4
    seed: int = 0
    model: str = "hrnet_fcn"


def build(case: Case) -> SegmentationModel:
    """The model of ``case`` (same weights for the same seed), in train mode and ``case.dtype``."""
    torch.manual_seed(case.seed)
    model: SegmentationModel
    if case.model == "ehsnet":  # the LRD's 7/15/31 depth-wise kernels and the ECR, at tiny widths
        model = EHSNet(CLASSES, 3, output_stride=case.output_stride, lrd_k=8, lrd_d=8, hard_ratio=0.1)
    else:
        model = HRNetFCN(CLASSES, 3, backbone="hrnet_w18", output_stride=case.output_stride)
    # random running statistics and affine terms so that the comparison covers them
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    if case.dtype == "float64":
        model.double()
        # the normaliser casts raw bands to float32; float64 checks feed normalised values instead
        model.normalizer = nn.Identity()
    return model.train()


def checkpointed(model: SegmentationModel, case: Case) -> SegmentationModel:
    """Install stage checkpointing if ``case`` asks (after :func:`spatialize`: it freezes the layers it finds)."""
    if case.checkpoint:
        set_segment_runner(model, TorchCheckpointRunner(model.checkpoint_plan("stage"), batchnorm_modules(model)))
    return model


def scene(case: Case) -> tuple[Tensor, Tensor]:
    """``(1, 3, H, W)`` image and ``(1, H, W)`` uint8 labels with blocky classes and ignored pixels."""
    generator = torch.Generator().manual_seed(case.seed + 1)
    # drawn in float64 for every dtype, so a float32 case is the float64 case rounded
    image = torch.randn(1, 3, case.height, case.width, generator=generator, dtype=torch.float64).to(getattr(torch, case.dtype))
    coarse = torch.randint(0, CLASSES, (1, 1, case.height // 8 + 1, case.width // 8 + 1), generator=generator)
    label = nn.functional.interpolate(coarse.float(), scale_factor=8, mode="nearest")[0, :, : case.height, : case.width]
    label = label.to(torch.uint8)
    label[:, 5:9, 10:20] = IGNORE
    return image, label


def loss_fn(case: Case) -> Any:
    return build_loss(case.loss, CLASSES, IGNORE)


def reference(case: Case) -> dict[str, Any]:
    """The one-rank run on the whole scene: logits, loss, gradients, running statistics."""
    model = checkpointed(build(case), case)
    image, label = scene(case)
    out = model(image)
    loss = loss_fn(case)(out, label)
    loss.backward()
    return _record(model, out["logits"], loss)


def _record(model: nn.Module, logits: Tensor, loss: Tensor) -> dict[str, Any]:
    return {
        "logits": logits.detach(),
        "loss": loss.detach(),
        "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
    }


def spatial_run(rank: int, size: int, case: Case, collectives: Any = comm, model: nn.Module | None = None) -> dict[str, Any]:
    """This rank's band of the scene through the spatial model: its logits, the scene loss,
    the group-summed gradients and the running statistics.

    ``model``: this rank's copy of :func:`build`'s model (threads share torch's global seed,
    so they cannot build it themselves); built here when None.
    """
    model = build(case) if model is None else model
    group = SpatialGroup(collectives, rank, size)
    checkpointed(spatialize(model, group), case)
    image, label = scene(case)
    start, stop = band_bounds(case.height, size, model.pad_multiple)[rank]
    outputs = model(image[..., start:stop, :])
    share = SpatialLoss(loss_fn(case), group)(outputs, label[:, start:stop])
    share.backward()
    gradient_sum(model, lambda grad: collectives.all_reduce(grad))
    return {**_record(model, outputs["logits"], collectives.all_reduce(share.detach())), "rows": group.rows}


def run_rank(rank: int, size: int, case: Case, out: Path) -> None:
    """:func:`spatial_run` over ``torch.distributed``; results to ``out/rank<rank>.pt``."""
    torch.save(spatial_run(rank, size, case), out / f"rank{rank}.pt")


def spawned(rank: int, size: int, case: dict[str, Any], out: str) -> None:
    """Entry point of a ``torch.multiprocessing.spawn`` worker (a ``file://`` rendezvous in ``out``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=size)
    try:
        run_rank(rank, size, Case(**case), Path(out))
    finally:
        dist.destroy_process_group()


def main() -> None:
    """Entry point under the ``deepspeed`` launcher."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True, help="a Case as JSON")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed

    torch.set_num_threads(1)
    deepspeed.init_distributed(verbose=False)
    run_rank(dist.get_rank(), dist.get_world_size(), Case(**json.loads(args.case)), args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
