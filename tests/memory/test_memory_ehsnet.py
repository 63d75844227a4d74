"""On a small EHSNet, every memory lever trains exactly like plain training."""

from __future__ import annotations

import pytest
import torch

from lrss_ds.memory import MemoryMode
from tests.memory.test_memory_levers import assert_same_training, train_pass

models = pytest.importorskip("lrss_ds.models")
losses = pytest.importorskip("lrss_ds.models.losses")
if "ehsnet" not in getattr(models, "MODEL_BUILDERS", {}):
    pytest.skip("build_model('ehsnet') is not available yet", allow_module_level=True)

CLASSES = 5


def small_ehsnet() -> torch.nn.Module:
    """EHSNet-W18 at output stride 8 with a narrow LRD (k = d = 32) to keep the test quick."""
    return models.build_model("ehsnet", num_classes=CLASSES, in_channels=4, lrd_k=32, lrd_d=32)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    image = torch.randint(0, 256, (1, 4, 96, 128), dtype=torch.uint8)
    label = torch.randint(0, CLASSES, (1, 96, 128), dtype=torch.uint8)
    label[:, :8, :8] = 255  # some ignored pixels
    return image, label


@pytest.fixture(scope="module")
def plain(batch) -> dict:
    return train_pass(small_ehsnet, MemoryMode(), *batch, losses.build_loss("ehsnet", CLASSES, 255), passes=1)


@pytest.mark.parametrize(
    "mode",
    [
        MemoryMode(checkpointing="stage"),
        MemoryMode(checkpointing="fine"),
        MemoryMode(checkpointing="fine", cpu_checkpointing=True, offload_saved_tensors=True),
        MemoryMode(checkpointing="fine", loss_band_rows=24),
    ],
    ids=["stage", "fine", "cpu_ckpt_offload", "fine_banded_loss"],
)
def test_ehsnet_lever_matches_plain_training(mode: MemoryMode, batch, plain) -> None:
    loss_fn = losses.build_loss("ehsnet", CLASSES, 255, band_rows=mode.loss_band_rows)
    got = train_pass(small_ehsnet, mode, *batch, loss_fn, passes=1)
    counts = {int(b) for n, b in got["buffers"].items() if n.endswith("num_batches_tracked")}
    assert counts == {1}
    # bands add their sums in another order: gradients equal to 2e-5 of their scale
    assert_same_training(got, plain, grad_scale_tol=2e-5 if mode.loss_band_rows else 0.0)
