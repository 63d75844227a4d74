"""DeepSpeed-checkpointed recomputation runs under the forward's autocast, wherever the model was prepared.

``prepare_model`` runs before ``deepspeed.initialize`` moves the model to the accelerator. Here the
model is prepared on ``meta`` and then moved to the CPU, the same order with devices a CPU-only
machine has: the recomputation must follow the tensors it is given, not the device seen at
preparation.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lrss_ds.memory import MemoryMode, SavedTensorLedger, apply_memory_mode, prepare_model
from lrss_ds.memory.activation_checkpointing import AutocastState, checkpoint_device_type
from tests.memory.toy import ToySegmented, toy_loss

CPU_CKPT_BF16 = MemoryMode(checkpointing="stage", cpu_checkpointing=True, bf16=True)


class ToyWithoutStage2(ToySegmented):
    """The toy model without ``stage2`` in its plans, so that gradients can be compared bit for bit.

    ``stage2``'s input feeds two branches inside the segment and the aux head outside it; a
    reentrant checkpoint sums the branches' gradients before adding the aux head's, plain autograd
    in another order, and bf16 rounding turns that float32 difference (3e-7) into 2%.
    """

    def segment_plan(self, granularity: str) -> list[str]:
        return [name for name in super().segment_plan(granularity) if name != "stage2"]


def prepared_elsewhere(cls: type[ToySegmented] = ToySegmented) -> ToySegmented:
    """A toy model (seed-0 weights) prepared for :data:`CPU_CKPT_BF16` on ``meta``, then moved to the CPU."""
    torch.manual_seed(0)
    weights = cls().state_dict()
    with torch.device("meta"):
        model = cls()
    prepare_model(model, CPU_CKPT_BF16)
    model.to_empty(device="cpu")
    model.load_state_dict(weights)
    return model


@pytest.fixture(scope="module")
def toy_batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(2)
    return torch.randint(0, 256, (1, 4, 29, 35), dtype=torch.uint8), torch.randint(0, 3, (1, 29, 35), dtype=torch.uint8)


def test_recompute_sees_the_forward_autocast(toy_batch: tuple[Tensor, Tensor]) -> None:
    model = prepared_elsewhere().train()
    seen: list[tuple[bool, torch.dtype]] = []
    model.block1.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    with apply_memory_mode(model, CPU_CKPT_BF16, SavedTensorLedger()) as memory:
        with memory.autocast():
            loss = toy_loss(model(toy_batch[0]), toy_batch[1])
        loss.backward()  # outside autocast, as the trainer runs it
    assert seen == [(True, torch.bfloat16), (True, torch.bfloat16)]  # forward, recomputation


def one_pass(model: nn.Module, mode: MemoryMode, image: Tensor, label: Tensor) -> dict[str, Any]:
    """Forward under the mode's autocast, backward outside it; the loss and the gradients."""
    model.train()
    torch.manual_seed(1)  # dropout draws
    with apply_memory_mode(model, mode) as memory:
        with memory.autocast():
            loss = toy_loss(model(image), label)
        loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


def test_gradients_equal_the_uncheckpointed_bf16_run(toy_batch: tuple[Tensor, Tensor]) -> None:
    torch.manual_seed(0)
    reference = ToyWithoutStage2()
    prepare_model(reference, MemoryMode(bf16=True))
    plain = one_pass(reference, MemoryMode(bf16=True), *toy_batch)
    got = one_pass(prepared_elsewhere(ToyWithoutStage2), CPU_CKPT_BF16, *toy_batch)
    torch.testing.assert_close(got["loss"], plain["loss"], rtol=0, atol=0)
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=0, msg=name)


def test_autocast_state_restores_the_device_and_the_cpu_state() -> None:
    with torch.autocast("cpu", dtype=torch.float16):
        state = AutocastState.capture("cpu")
    inside: list[Any] = []
    with torch.autocast("cpu", enabled=False):
        with state.restored():
            inside.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    assert inside == [(True, torch.float16)]
    assert not torch.is_autocast_enabled("cpu")


def test_device_type_follows_the_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.accelerator

    class Accelerator:
        def device_name(self, device_index: int | None = None) -> str:
            return "cuda"

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", Accelerator)
    assert checkpoint_device_type([torch.zeros(1), torch.zeros(1, device="meta")]) == "meta"
    assert checkpoint_device_type([torch.zeros(1)]) == "cuda"  # all on the host: the accelerator's
    assert AutocastState.capture("meta").device is None  # meta has no autocast; the CPU state is kept
