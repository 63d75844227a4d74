"""The GPU path checked on a CPU-only machine: collectives, RNG, device memory, fp16 skips, host copies.

A recording stand-in for ``torch.distributed`` notes the device of every tensor a collective gets
and, like nccl, refuses any tensor not on the device of the stand-in accelerator, which names
``meta``. Meta tensors carry no values, so the stand-in stops the call (:class:`Reached`) once it
has recorded an accepted collective. Other stand-in accelerators keep an RNG of their own or count
peak memory; the training loop runs on the stand-in engine of ``test_engine_units.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lrss_ds.engine import comm
from lrss_ds.engine.metrics import ConfusionMatrix
from lrss_ds.engine.trainer import any_rank, parameter_digests

REPO = Path(__file__).resolve().parents[2]


class Reached(Exception):
    """The recording stand-in accepted a collective on the stand-in device (and has no values to return)."""


class StandInAccelerator:
    """A DeepSpeed accelerator whose device is ``device`` (``meta``: no values, no CUDA needed)."""

    def __init__(self, device: str = "meta") -> None:
        self.device = device

    def device_name(self, device_index: int | None = None) -> str:
        return self.device

    def current_device_name(self) -> str:
        return self.device


class RecordingDist:
    """Stands in for a 2-rank ``torch.distributed`` group whose backend serves ``device`` only."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.calls: list[tuple[str, str]] = []

    def _take(self, name: str, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            self.calls.append((name, tensor.device.type))
            if tensor.device.type != self.device:
                # nccl's words for a host tensor (the same as a group opened as "cuda:gloo")
                raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise Reached(name)

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> None:
        self._take("all_reduce", tensor)

    def all_gather(
        self, outputs: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False
    ) -> None:
        self._take("all_gather", tensor, *outputs)

    def all_gather_object(self, outputs: list[Any], obj: Any, group: Any = None) -> None:
        # torch picks the device of this one itself (the current CUDA device under nccl)
        self.calls.append(("all_gather_object", "chosen by torch"))
        raise RuntimeError("all_gather_object: the device is not the caller's choice")


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> RecordingDist:
    """A 2-rank job on a ``meta`` accelerator, every collective recorded."""
    import deepspeed.accelerator

    recorder = RecordingDist("meta")
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: StandInAccelerator("meta"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name in ("all_reduce", "all_gather", "all_gather_object"):
        monkeypatch.setattr(dist, name, getattr(recorder, name))
    return recorder


def test_any_rank_reduces_on_the_accelerator(recording: RecordingDist) -> None:
    with pytest.raises(Reached):
        any_rank(True)
    assert recording.calls == [("all_reduce", "meta")]


def test_confusion_matrix_reduces_on_the_accelerator(recording: RecordingDist) -> None:
    matrix = ConfusionMatrix(3, 255)
    matrix.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    with pytest.raises(Reached):
        matrix.all_reduce()
    assert recording.calls == [("all_reduce", "meta")]


def test_parameter_digests_gather_on_the_accelerator(recording: RecordingDist) -> None:
    class Engine:
        module = nn.Linear(2, 2)

        def zero_optimization_stage(self) -> int:
            return 2

    with pytest.raises(Reached):
        parameter_digests(Engine())
    assert recording.calls and set(recording.calls) == {("all_gather", "meta")}


def test_one_rank_needs_no_collective() -> None:
    assert not dist.is_initialized()
    assert any_rank(True) is True and any_rank(False) is False
    assert comm.all_gather_bytes(b"\x01\x02") == [b"\x01\x02"]


# Calls that move tensors between ranks; barrier carries none of ours and is left out.
_TENSOR_COLLECTIVE = re.compile(
    r"\b(?:dist|distributed)\.(all_reduce|all_gather\w*|broadcast\w*|reduce\w*|gather\w*|scatter\w*|all_to_all\w*|"
    r"i?send|i?recv)\("
)


def test_every_collective_goes_through_the_comm_module() -> None:
    """The audit, kept: a new collective elsewhere would choose its own device (or none)."""
    offenders = []
    for root in ("lrss_ds", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path == REPO / "lrss_ds" / "engine" / "comm.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _TENSOR_COLLECTIVE.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_a_cuda_gloo_group_refuses_host_tensors(tmp_path: Path) -> None:
    """The stand-in's premise, on the real library: a group whose backend serves CUDA tensors only
    (as nccl does) refuses a host tensor with the message the stand-in uses."""
    dist.init_process_group("cuda:gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(1, dtype=torch.int32))
    finally:
        dist.destroy_process_group()



class RngAccelerator(StandInAccelerator):
    """A stand-in accelerator with a generator of its own, as CUDA has one per device."""

    def __init__(self, device: str = "meta") -> None:
        super().__init__(device)
        self.generator = torch.Generator().manual_seed(7)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device_index: int | None = None) -> None:
        self.generator.set_state(state)


@pytest.fixture
def rng_accelerator(monkeypatch: pytest.MonkeyPatch) -> RngAccelerator:
    import deepspeed.accelerator

    accelerator = RngAccelerator()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    return accelerator


def test_resume_restores_the_accelerator_rng(rng_accelerator: RngAccelerator, tmp_path: Path) -> None:
    from lrss_ds.engine import training_checkpoints

    torch.save(training_checkpoints.rng_state(), tmp_path / "rng_rank0.pt")
    expected = torch.rand(4, generator=rng_accelerator.generator)
    training_checkpoints.set_rng_state(torch.load(tmp_path / "rng_rank0.pt", weights_only=False))
    assert torch.equal(torch.rand(4, generator=rng_accelerator.generator), expected)


def test_a_checkpoint_without_the_accelerator_rng_still_resumes(rng_accelerator: RngAccelerator) -> None:
    from lrss_ds.engine import training_checkpoints

    state = training_checkpoints.rng_state()
    old_format = {key: state[key] for key in ("python", "numpy", "torch")}
    expected_cpu = torch.rand(3)
    drawn = torch.rand(2, generator=rng_accelerator.generator)
    training_checkpoints.set_rng_state(old_format)
    assert torch.equal(torch.rand(3), expected_cpu)
    assert not torch.equal(torch.rand(2, generator=rng_accelerator.generator), drawn)  # left as it was


def test_another_accelerators_rng_is_not_restored(
    rng_accelerator: RngAccelerator, caplog: pytest.LogCaptureFixture
) -> None:
    from lrss_ds.engine import training_checkpoints

    state = training_checkpoints.rng_state()
    state["accelerator"]["name"] = "cuda"
    drawn = torch.rand(2, generator=rng_accelerator.generator)
    training_checkpoints.set_rng_state(state)
    assert not torch.equal(torch.rand(2, generator=rng_accelerator.generator), drawn)
    assert "cuda RNG state is not restored on the meta accelerator" in caplog.text



class MemoryAccelerator(RngAccelerator):
    """A stand-in accelerator whose peak counters follow :meth:`allocate` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated = self.reserved = 0
        self.resets = 0

    def allocate(self, nbytes: int) -> None:
        self.allocated = max(self.allocated, nbytes)
        self.reserved = max(self.reserved, nbytes + (nbytes >> 1))  # the caching allocator keeps more

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        self.allocated = self.reserved = 0
        self.resets += 1

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return self.allocated

    def max_memory_reserved(self, device_index: int | None = None) -> int:
        return self.reserved

    def communication_backend_name(self) -> str:
        return "nccl"  # what the training log's accelerator line reads before a group is open


GIB = 1 << 30


def loop_run(tmp_path: Path, iterations: int) -> Any:
    """The stand-in run of ``tests/engine/test_engine_units.py``, logging to ``log.txt``."""
    from tests.engine.test_engine_units import stand_in_run

    run = stand_in_run(tmp_path, nan_calls=set(), iterations=iterations, max_nonfinite=0)
    run.log = open(tmp_path / "log.txt", "a")
    return run


def test_device_memory_is_reported_per_phase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train steps take 1 GiB and evaluation 3 GiB: no figure mixes the two."""
    import deepspeed.accelerator

    from lrss_ds.engine import trainer

    accelerator = MemoryAccelerator()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    run = loop_run(tmp_path, iterations=2)
    loss_fn = run.loss_fn
    run.loss_fn = lambda outputs, target: (accelerator.allocate(GIB), loss_fn(outputs, target))[1]

    def validate(run: Any) -> dict[str, Any]:
        accelerator.allocate(3 * GIB)
        return {"miou": 0.5, "mean_f1": 0.5, "oa": 0.5, "seconds": 0.0, "classes": ["a"], "iou": [0.5]}

    monkeypatch.setattr(trainer, "validate", validate)
    run.val_set, run.config.train.eval_every = object(), 1
    assert trainer.train(run, resume=False) == 0
    run.log.close()
    log = (tmp_path / "log.txt").read_text()
    train_lines = [line for line in log.splitlines() if " it " in line]
    eval_lines = [line for line in log.splitlines() if " eval @" in line and "done:" not in line]
    assert len(train_lines) == 2 and len(eval_lines) == 2
    assert all("device max alloc/reserved 1.00/1.50G" in line for line in train_lines), train_lines
    assert all("device max alloc/reserved 3.00/4.50G" in line for line in eval_lines), eval_lines
    device = json.loads((tmp_path / "metrics.json").read_text())["memory"]["device"]
    assert device == {
        "train": {"max_allocated_gib": 1.0, "max_reserved_gib": 1.5},
        "eval": {"max_allocated_gib": 3.0, "max_reserved_gib": 4.5},
    }


def test_device_memory_on_the_cpu_says_not_measured(tmp_path: Path) -> None:
    from lrss_ds.engine.trainer import train

    run = loop_run(tmp_path, iterations=1)
    assert train(run, resume=False) == 0
    run.log.close()
    assert "device n/a (CPU)" in (tmp_path / "log.txt").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["memory"]["device"] == "n/a (CPU)"


def test_steps_the_loss_scaler_skipped_are_reported(tmp_path: Path) -> None:
    """DeepSpeed counts an overflowed fp16 step as a global step, but steps neither the optimizer
    nor the LR schedule."""
    from lrss_ds.engine.trainer import train

    run = loop_run(tmp_path, iterations=3)
    engine = run.engine
    step = engine.step

    def overflow_on_the_second_step() -> None:
        if engine.global_steps == 1:
            engine.skipped_steps += 1
            engine.global_steps += 1
            engine.optimizer.zero_grad()
        else:
            step()

    engine.step = overflow_on_the_second_step
    assert train(run, resume=False) == 0
    run.log.close()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["iteration"] == 3
    assert [h["skipped"] for h in metrics["history"]] == [False, True, False]
    log = (tmp_path / "log.txt").read_text()
    assert "skipped the optimizer step of iteration 2" in log
    assert [line.split(" skipped ")[1][0] for line in log.splitlines() if " it " in line] == ["0", "1", "1"]



_HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def test_banded_loss_reads_nothing_back_per_band(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every value a tensor hands to Python waits for the device; the banded loss reads
    the same number of values (its label check) however many bands it runs."""
    from lrss_ds.models.losses import build_loss

    torch.manual_seed(0)
    outputs = {
        "logits": torch.randn(1, 3, 10, 12, requires_grad=True),
        "aux": [torch.randn(1, 3, 10, 12, requires_grad=True)],
        "input_size": (37, 45), "padded_size": (40, 48),
    }
    target = torch.randint(0, 3, (1, 37, 45), dtype=torch.uint8)
    reads: list[str] = []

    def count(name: str) -> None:
        method = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            return method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_of(band_rows: int) -> tuple[int, torch.Tensor]:
        reads.clear()
        for name in _HOST_READS:
            count(name)
        loss = build_loss("ehsnet", 3, 255, band_rows=band_rows)(outputs, target)
        loss.backward()
        monkeypatch.undo()
        return len(reads), loss.detach()

    one_band, loss_one = reads_of(37)
    many_bands, loss_many = reads_of(4)  # 10 bands
    assert many_bands == one_band <= 1
    torch.testing.assert_close(loss_many, loss_one)


def test_source_span_on_the_host_equals_the_device_indices() -> None:
    from lrss_ds.models.losses import _linear_source, _source_span

    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for in_size, out_size in ((10, 40), (863, 6908), (7, 7), (913, 7300), (17, 1000)):
            for start, stop in ((0, 1), (0, out_size), (3, min(out_size, 131)), (out_size - 5, out_size)):
                i0, i1, _ = _linear_source(start, stop, in_size, out_size, torch.device("cpu"), dtype)
                assert _source_span(start, stop, in_size, out_size, dtype) == (int(i0[0]), int(i1[-1]) + 1)



def test_loaders_pin_host_memory_when_the_batches_go_to_an_accelerator() -> None:
    from lrss_ds.engine.loaders import ResumableSampler, make_eval_loader, make_train_loader
    from tests.engine.test_engine_units import Scenes

    for device, pinned in ((torch.device("meta"), True), (torch.device("cpu"), False)):
        sampler = ResumableSampler(3, 0, 1, seed=0)
        assert make_train_loader(Scenes(), sampler, 1, 0, 2, device).pin_memory is pinned
        assert make_eval_loader(Scenes(), 0, 1, 0, device)[0].pin_memory is pinned


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_the_trainer_pins_for_the_engines_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lrss_ds.engine import trainer

    run = loop_run(tmp_path, iterations=1)
    run.engine.device = torch.device("meta")
    loaders: list[Any] = []
    make = trainer.make_train_loader
    monkeypatch.setattr(trainer, "make_train_loader", lambda *args: loaders.append(make(*args)) or loaders[-1])
    monkeypatch.setattr(trainer, "train_step", lambda run, batch: (run.engine.step(), 0.5)[1])
    assert trainer.train(run, resume=False) == 0
    run.log.close()
    assert len(loaders) == 1 and loaders[0].pin_memory



def test_gpu_experiments_carry_no_cpu_cache_tuning() -> None:
    """A YAML naming a GPU JSON (not ``cpu*.json``) runs no banded stem: its 32-row bands were
    sized for a CPU's cache (see ds_configs/README.md)."""
    from lrss_ds.engine.config import load_config
    from lrss_ds.engine.setup import resolve_memory_mode

    gpu = []
    for path in sorted((REPO / "ds_configs").glob("*.yaml")):
        config = load_config(path)
        if not Path(config.deepspeed.config).name.startswith("cpu"):
            gpu.append(path.name)
            assert resolve_memory_mode(config).stem_band_rows is None, path.name
    assert {"ehsnet_fbp.yaml", "ehsnet_inria.yaml", "glsnet_deepglobe.yaml", "glsnet_vaihingen.yaml"} <= set(gpu)


@pytest.mark.slow
@pytest.mark.launcher
def test_two_ranks_train_with_cpu_checkpointing_under_a_bf16_json(tmp_path: Path) -> None:
    """The ``deepspeed`` launcher, 2 ranks, DeepSpeed-checkpointed segments, bf16 weights from the
    JSON: the recomputation in backward must run under the forward's bf16 autocast, or its fp32
    activations meet bf16 weights in the first backward."""
    import json

    from lrss_ds.engine.config import DataConfig, SynthConfig
    from lrss_ds.engine.synthetic_store import prepare_synthetic_store
    from tests.engine.test_engine_launcher import TINY, launch, read_log

    store = tmp_path / "store"
    synth = SynthConfig(train_scenes=2, val_scenes=1, height=128, width=128, bands=4, seed=5)
    prepare_synthetic_store(DataConfig(store=str(store), synthetic=synth), log=lambda line: None)
    config = tmp_path / "tiny_bf16.yaml"
    config.write_text(TINY.format(store=store, ds_json=REPO / "ds_configs" / "cpu_bf16.json"))
    out = tmp_path / "run"
    status = launch(
        config, out, 2, "memory.cpu_checkpointing=true", "train.iterations=2", "train.checkpoint_every=0",
        "data.workers=0",
    )
    assert status == 0, read_log(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["world_size"] == 2 and metrics["iteration"] == 2
    assert metrics["memory_mode"]["cpu_checkpointing"] and metrics["memory_mode"]["checkpointing"] == "stage"
    assert all(abs(h["loss"]) < 1e6 for h in metrics["history"])  # finite
    digests = metrics["parameter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]


class BindingAccelerator(StandInAccelerator):
    """A stand-in GPU accelerator that records which device index was made current."""

    def __init__(self) -> None:
        super().__init__("cuda")
        self.bound: list[int] = []

    def set_device(self, index: int) -> None:
        self.bound.append(index)


def test_each_rank_binds_its_local_device_before_the_process_group_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL runs collectives on the current device: rank 3 of a node binds device 3 before the group
    exists, also in jobs that never build an engine (batch prediction)."""
    import deepspeed
    import deepspeed.accelerator

    from lrss_ds.engine import setup

    accelerator = BindingAccelerator()
    order: list[str] = []
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: accelerator)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(order))
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda **kwargs: order.append(f"group opened, bound {accelerator.bound}"))
    monkeypatch.setattr(setup, "release_shared_memory_name", lambda: None)
    monkeypatch.setattr(dist, "get_rank", lambda: 7)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    for key, value in {"RANK": "7", "LOCAL_RANK": "3", "WORLD_SIZE": "8", "LOCAL_SIZE": "4",
                       "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    info = setup.init_distributed()
    assert order == ["group opened, bound [3]"] and info.local_rank == 3

    cpu = BindingAccelerator()
    cpu.device = "cpu"
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: cpu)
    setup.bind_local_device()
    assert cpu.bound == []  # the CPU accelerator has no device to choose
