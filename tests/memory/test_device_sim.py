"""The simulated device peak: exact counts on toy tensors, offload moves, and agreement with RSS."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lrss_ds.memory import SavedTensorHooks, SavedTensorLedger
from lrss_ds.memory.device_sim import (
    DEVICE_FIXED_MARGIN_BYTES,
    DEVICE_FRAGMENTATION_FRACTION,
    DeviceMemorySimulator,
    active_simulator,
    allocator_budget,
    device_bytes_needed,
)

FLOAT = 4


def test_counts_exact_bytes_of_new_tensors() -> None:
    sim = DeviceMemorySimulator()
    with sim:
        a = torch.empty(1000)
        b = torch.zeros(10, 10, dtype=torch.float64)
        assert sim.device_bytes == 1000 * FLOAT + 100 * 8
        assert sim.new_bytes == sim.device_bytes and sim.host_bytes == 0
    del a, b


def test_views_and_in_place_results_are_not_counted_twice() -> None:
    sim = DeviceMemorySimulator()
    with sim:
        a = torch.empty(1000)
        views = [a[10:], a.view(10, 100).t(), a.reshape(-1), a.as_strided((5,), (2,))]
        a.add_(1.0)
        a.mul_(2.0)
        assert sim.device_bytes == 1000 * FLOAT
    del views, a


def test_freed_tensors_leave_the_total_but_not_the_peak() -> None:
    sim = DeviceMemorySimulator()
    with sim:
        a = torch.empty(1000)
        b = a * 2
        view = b[1:]
        del b  # the view still holds the storage
        assert sim.device_bytes == 2000 * FLOAT
        del view
        assert sim.device_bytes == 1000 * FLOAT
    del a  # frees are followed after the simulation too
    gc.collect()
    assert sim.device_bytes == 0
    assert sim.peak_device_bytes == 2000 * FLOAT
    sim.reset_peaks()
    assert sim.peak_device_bytes == 0


def test_host_context_and_existing_tensors() -> None:
    existing = torch.ones(300)
    sim = DeviceMemorySimulator()
    with sim:
        with sim.on_host():
            host = torch.zeros(250)
        total = existing.sum()  # an existing input is found on its first use, on the device, not new
        assert active_simulator() is sim
    assert active_simulator() is None
    assert sim.host_bytes == 250 * FLOAT
    assert sim.device_bytes == 300 * FLOAT + total.untyped_storage().nbytes()
    assert sim.new_bytes == 250 * FLOAT + total.untyped_storage().nbytes()
    sim.track([host], host=False)  # moving a followed storage to the other side
    assert (sim.host_bytes, sim.device_bytes) == (0, 550 * FLOAT + 4)


def test_cards_hold_the_peak_plus_the_margin() -> None:
    from lrss_ds.engine.plan import Prediction, card_fits

    gib = 2**30
    assert device_bytes_needed(0) == DEVICE_FIXED_MARGIN_BYTES
    assert allocator_budget(device_bytes_needed(10 * gib)) == pytest.approx(10 * gib)
    assert allocator_budget(DEVICE_FIXED_MARGIN_BYTES / 2) == 0
    # 20 GiB simulated needs 20 * (1 + fraction) + fixed > 24 GiB: a 24 GB card does not hold it
    peak = 20 * gib
    prediction = Prediction("none", peak, 0.0, 1.0, 1.0, True, -1, "ds_configs/cpu.json", "none")
    cards = card_fits([prediction])["none"]
    assert cards["needed_bytes"] == peak * (1 + DEVICE_FRAGMENTATION_FRACTION) + DEVICE_FIXED_MARGIN_BYTES
    assert (cards["24"], cards["40"], cards["80"]) == (False, True, True)


def _forward(offload: bool) -> tuple[dict[str, int], SavedTensorLedger, DeviceMemorySimulator, nn.Module]:
    """Forward of conv -> relu -> sum under the saved-tensor hooks; counts at the end of forward.

    The conv's input ``h`` is made inside and dropped, so what keeps the saved tensors on the
    device is autograd alone: offloading must move exactly the ledger's bytes to the host.
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 48, 40)
    ledger, sim = SavedTensorLedger(), DeviceMemorySimulator()
    with sim, SavedTensorHooks(ledger, offload).installed():
        h = x.clone()
        loss = torch.relu(conv(h)).sum()
        del h
        at_end_of_forward = sim.snapshot()
        loss.backward()
    return at_end_of_forward, ledger, sim, conv


def test_offloaded_saved_tensors_move_to_the_host_exactly_as_the_ledger_says() -> None:
    kept, kept_ledger, _, conv_kept = _forward(offload=False)
    moved, moved_ledger, sim, conv_moved = _forward(offload=True)
    offloaded = moved_ledger.peak_offloaded_bytes
    # the conv's input and the relu's output: (3 + 8) channels of 48 x 40 floats
    assert offloaded == kept_ledger.peak_device_bytes == (3 + 8) * 48 * 40 * FLOAT
    assert moved["host_bytes"] == offloaded and kept["host_bytes"] == 0
    assert kept["device_bytes"] - moved["device_bytes"] == offloaded
    # the copies made to the host are gone after backward; gradients are those of the kept run
    assert sim.host_bytes == 0
    torch.testing.assert_close(conv_moved.weight.grad, conv_kept.weight.grad)


# --- the step's RSS growth (fresh process) ------------------------------------------------


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_step_child(model: str, side: int) -> dict[str, Any]:
    """One warm-up and one measured training step (AdamW, nothing offloaded) of ``model``.

    Returns the measured step's simulated peak of bytes allocated in it and its RSS growth:
    the kernel's high-water mark (reset through ``/proc/self/clear_refs`` before the step)
    minus the resident set before it.
    """
    from lrss_ds.models import build_model
    from lrss_ds.models.losses import build_loss

    torch.manual_seed(0)
    net = build_model(model, num_classes=6, in_channels=4)
    loss_fn = build_loss("ce", 6, 255)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    image = torch.randint(0, 256, (1, 4, side, side), dtype=torch.uint8)
    label = torch.randint(0, 6, (1, side, side), dtype=torch.uint8)

    def step() -> None:
        loss_fn(net(image), label).backward()
        optimizer.step()

    step()  # first-use costs (optimizer state, oneDNN primitives) are outside the measured step
    # Freed before the measurement, so that the gradients are allocated again inside the step
    # (freeing them inside would lower the RSS by bytes the simulation never counted as new).
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss_before = _vm_kib("VmRSS")
    sim = DeviceMemorySimulator()
    with sim:
        step()
    return {
        "simulated_peak_bytes": sim.peak_new_bytes,
        "simulated_device_peak_bytes": sim.peak_device_bytes,
        "simulated_host_peak_bytes": sim.peak_host_bytes,
        "rss_growth_bytes": (_vm_kib("VmHWM") - rss_before) * 1024,
    }


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_simulated_peak_agrees_with_the_steps_rss_growth_without_offload() -> None:
    from lrss_ds.engine.isolated import run_isolated

    run = run_isolated(
        "tests.memory.test_device_sim:rss_step_child", {"model": "hrnet_fcn", "side": 256},
        env={"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}, timeout_s=300,
    )
    assert run.status == "ok", run.error
    res = run.result
    assert res["simulated_host_peak_bytes"] == 0
    assert res["rss_growth_bytes"] > 128 * 2**20  # the step dominates the fixed costs
    ratio = res["simulated_peak_bytes"] / res["rss_growth_bytes"]
    assert abs(ratio - 1) <= 0.10, res


def test_trainer_reports_the_simulated_peak_on_request(tmp_path: Path) -> None:
    import json

    from lrss_ds.engine.trainer import train
    from tests.engine.test_engine_units import stand_in_run

    peaks = {}
    for requested in (False, True):
        run = stand_in_run(tmp_path / str(requested), nan_calls=set(), iterations=2, max_nonfinite=0)
        run.config.train.simulate_device_memory = requested
        assert train(run, resume=False) == 0
        peaks[requested] = json.loads((tmp_path / str(requested) / "metrics.json").read_text())["memory"]
    assert "simulated_device_peak_gib" not in peaks[False]
    peak = peaks[True]["simulated_device_peak_gib"] * 2**30
    # at least the 1x1 conv's parameters and gradients (2 x 9 floats), the float input (2 x 8 x 8)
    # and the logits (3 x 8 x 8); far below a MiB for these 8 x 8 scenes
    assert (2 * 9 + 2 * 64 + 3 * 64) * FLOAT <= peak < 2**20
    assert peaks[True]["simulated_host_peak_gib"] == 0
