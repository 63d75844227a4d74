"""Each memory lever trains exactly like plain training: same loss, gradients and BN statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from lrss_ds.memory import MemoryMode, SavedTensorLedger, apply_memory_mode, get_memory_mode, prepare_model
from tests.memory.toy import ToySegmented, toy_loss


def train_pass(
    build: Callable[[], nn.Module],
    mode: MemoryMode,
    image: Tensor,
    label: Tensor,
    loss_fn: Callable[[dict, Tensor], Tensor],
    passes: int = 2,
) -> dict[str, Any]:
    """Build a model (seed 0), run ``passes`` forward+backward passes under ``mode``.

    Returns loss values, gradients (accumulated over the passes) and BN buffers.
    """
    torch.manual_seed(0)
    model = build()
    model.train()
    runner = prepare_model(model, mode)
    ledger = SavedTensorLedger()
    losses = []
    torch.manual_seed(1)  # dropout draws
    for _ in range(passes):
        with apply_memory_mode(model, mode, ledger) as mem:
            with mem.autocast():
                loss = loss_fn(model(image), label)
            loss.backward()
        losses.append(loss.detach())
    if runner is not None:
        assert runner.unused_plan_names() == set()
    return {
        "loss": torch.stack(losses),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "ledger": ledger,
        "model": model,
    }


def assert_same_training(
    got: dict, ref: dict, rtol: float = 1e-5, atol: float = 1e-6, grad_scale_tol: float = 0.0
) -> None:
    """Equal losses, every gradient and every buffer (BN mean/var/num_batches_tracked).

    ``grad_scale_tol`` > 0 also allows each gradient an absolute error of that fraction of
    its largest magnitude (summation order differs, e.g. a banded loss adds bands one by one).
    """
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=rtol, atol=atol)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, expected in ref["grads"].items():
        tol = max(atol, grad_scale_tol * float(expected.abs().max()))
        torch.testing.assert_close(got["grads"][name], expected, rtol=rtol, atol=tol, msg=name)
    for name in ref["buffers"]:
        torch.testing.assert_close(got["buffers"][name], ref["buffers"][name], rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def toy_batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(2)
    image = torch.randint(0, 256, (2, 4, 37, 45), dtype=torch.uint8)  # odd size: padded inside
    label = torch.randint(0, 3, (2, 37, 45), dtype=torch.uint8)
    return image, label


@pytest.fixture(scope="module")
def plain(toy_batch) -> dict:
    return train_pass(ToySegmented, MemoryMode(), *toy_batch, toy_loss)


def test_plain_run_updates_batchnorm_once_per_pass(plain) -> None:
    counts = {n: int(b) for n, b in plain["buffers"].items() if n.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {2}


@pytest.mark.parametrize(
    "mode",
    [
        MemoryMode(checkpointing="stage"),
        MemoryMode(checkpointing="block"),
        MemoryMode(checkpointing="fine"),
        MemoryMode(offload_saved_tensors=True),
        MemoryMode(checkpointing="stage", cpu_checkpointing=True),
        MemoryMode(checkpointing="fine", cpu_checkpointing=True, offload_saved_tensors=True),
    ],
    ids=["stage", "block", "fine", "offload", "cpu_ckpt", "cpu_ckpt_fine_offload"],
)
def test_lever_matches_plain_training(mode: MemoryMode, toy_batch, plain) -> None:
    assert_same_training(train_pass(ToySegmented, mode, *toy_batch, toy_loss), plain)


def test_plain_recomputation_would_update_batchnorm_twice(toy_batch) -> None:
    """The fixture that makes the lever tests meaningful: without the frozen-BN context a
    checkpointed run counts every BN twice per pass."""
    from torch.utils.checkpoint import checkpoint

    from lrss_ds.models.base import set_segment_runner

    torch.manual_seed(0)
    model = ToySegmented().train()
    plan = model.checkpoint_plan("stage")
    set_segment_runner(
        model, lambda name, fn, *a: checkpoint(fn, *a, use_reentrant=False) if name in plan else fn(*a)
    )
    toy_loss(model(toy_batch[0]), toy_batch[1]).backward()
    assert int(model.block1.bn.num_batches_tracked) == 2


def test_channels_last_matches_plain_closely(toy_batch, plain) -> None:
    # different convolution kernels: equal up to float rounding, not bit for bit
    layouts = []

    def build() -> nn.Module:
        model = ToySegmented()
        model.block2.register_forward_hook(lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last)))
        return model

    got = train_pass(build, MemoryMode(checkpointing="fine", channels_last=True), *toy_batch, toy_loss)
    assert layouts and all(layouts)
    assert all(p.is_contiguous() for p in got["model"].parameters())  # DeepSpeed needs plain layout
    assert_same_training(got, plain, rtol=1e-4, atol=1e-5)


def test_bf16_keeps_batchnorm_statistics_in_float32(toy_batch, plain) -> None:
    got = train_pass(ToySegmented, get_memory_mode("fullres_bf16"), *toy_batch, toy_loss)
    for name, buf in got["buffers"].items():
        if "running" in name:
            assert buf.dtype == torch.float32, name
            torch.testing.assert_close(buf, plain["buffers"][name], rtol=0.05, atol=0.05)
    for name, grad in got["grads"].items():
        assert grad.dtype == torch.float32, name
    torch.testing.assert_close(got["loss"], plain["loss"], rtol=0.02, atol=0.0)


def test_checkpointing_lowers_the_saved_bytes(toy_batch, plain) -> None:
    stage = train_pass(ToySegmented, MemoryMode(checkpointing="stage"), *toy_batch, toy_loss, passes=1)
    peak_plain = plain["ledger"].peak_device_bytes
    assert 0 < stage["ledger"].peak_device_bytes < peak_plain / 2
    assert stage["ledger"].device_bytes == 0 and plain["ledger"].device_bytes == 0  # all released


def test_offload_moves_every_saved_tensor_off_the_device_during_forward(toy_batch) -> None:
    mode = MemoryMode(checkpointing="stage", cpu_checkpointing=True, offload_saved_tensors=True)
    torch.manual_seed(0)
    model = ToySegmented().train()
    prepare_model(model, mode)
    ledger = SavedTensorLedger()
    with apply_memory_mode(model, mode, ledger):
        loss = toy_loss(model(toy_batch[0]), toy_batch[1])
        after_forward = ledger.snapshot()
        loss.backward()
    assert after_forward["device_bytes"] == 0
    # the 4 checkpoint inputs counted by the DeepSpeed runner plus the loss's saved tensors
    image_bytes = toy_batch[0].numel()  # the stem checkpoint input is not floating: not moved
    assert after_forward["offloaded_bytes"] > 4 * 40 * 48 * 4 - image_bytes
    assert ledger.device_bytes == 0 and ledger.offloaded_bytes == 0


def test_stepping_with_another_mode_than_prepared_is_refused() -> None:
    from lrss_ds.errors import TrainingError

    model = ToySegmented()
    prepare_model(model, MemoryMode(checkpointing="stage"))
    with pytest.raises(TrainingError, match="prepare_model"):
        with apply_memory_mode(model, dataclasses.replace(MemoryMode(), checkpointing="block")):
            pass
