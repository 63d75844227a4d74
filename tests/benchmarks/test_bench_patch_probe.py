"""The patch methods' time probe: every tile of the image once per pass, in micro-batches of the training's batch."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _harness import run_config  # noqa: E402


def test_tiles_go_in_micro_batches_of_one_shape_so_pooled_batchnorm_trains() -> None:
    # smp's DeepLabV3+ normalises a globally pooled 1 x 1 map: one tile per step cannot train
    # (BatchNorm needs more than one value per channel); 96 x 80 in 32 px tiles is 3 x 3 tiles,
    # six of 32 x 32 and three of 32 x 16: batches of 4 give 4 + 2 and 3 = three steps per image
    params = {"model": "smp", "height": 96, "width": 80, "mode": "none", "steps": 2, "bands": 4,
              "model_options": {"arch": "deeplabv3plus", "encoder": "resnet18"}, "loss": "ce"}
    run = run_config("_patch_probe:patch_training_step", {**params, "patch_size": 32, "patch_batch": 4}, threads=1)
    assert run.status == "ok", run.error[-1500:]
    assert run.result["optimizer_steps_per_image"] == 3
    single = run_config("_patch_probe:patch_training_step", {**params, "patch_size": 32, "patch_batch": 1}, threads=1)
    assert single.status == "error" and "Expected more than 1 value per channel" in single.error
