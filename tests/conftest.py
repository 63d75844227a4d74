"""Shared test settings: keep every test on the CPU accelerator; leave no DeepSpeed buffers behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

# DeepSpeed probes for an accelerator at import; on CPU-only machines say so up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# pytest-xdist workers split the cores (set before any test imports torch; children inherit it):
# two workers each running OpenMP with every core would spin on descheduled threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

_STARTED = pytest.StashKey[float]()
# band statistics of the stand_in_checkpoints runs (3 uint8 bands)
STAND_IN_MEAN, STAND_IN_STD = [90.0, 100.0, 110.0], [40.0, 45.0, 50.0]


@pytest.fixture(autouse=True, scope="session")
def _build_deepspeed_cpu_ops() -> None:
    """JIT-build DeepSpeed's CPU ops once, in this process, before any test starts a child.

    Many tests start DeepSpeed in subprocesses, and the benchmark harness kills children that pass
    their memory cap or time limit. A child killed while it holds torch's extension build lock
    (``~/.cache/torch_extensions/.../lock``) leaves the lock behind and every later build waits on
    it forever; building here first means children only load the cached library.
    """
    _load_deepspeed_cpu_ops()


def _load_deepspeed_cpu_ops() -> None:
    """Build (first time) and load the CPU ops the tests' DeepSpeed runs use."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    for builder_name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        builder = accelerator.create_op_builder(builder_name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)


def _is_xdist_worker(config: pytest.Config) -> bool:
    """True in a pytest-xdist worker process (the controller and a plain run are not workers)."""
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Note the start for the shared-memory clean-up; under pytest-xdist, build the ops in the controller.

    With ``-n N`` every worker would otherwise reach ``_build_deepspeed_cpu_ops`` at the same
    moment on a clean clone: one builds while the others wait on torch's build lock. Building
    here, before xdist starts its workers, leaves them only the cached library to load.
    """
    session.config.stash[_STARTED] = time.time()
    if not _is_xdist_worker(session.config) and getattr(session.config.option, "numprocesses", None):
        _load_deepspeed_cpu_ops()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Unlink the /dev/shm all-reduce buffers that tests calling DeepSpeed directly created.

    The engine unlinks its own (``lrss_ds.engine.setup.release_shared_memory_name``); tests
    that call ``deepspeed.initialize`` themselves would otherwise leave 66 MB of RAM per rank.
    Under pytest-xdist only the controller cleans up, after every worker has finished: a worker
    that finishes first must not unlink buffers another worker's test still opens by name.
    """
    if _is_xdist_worker(session.config) or _STARTED not in session.config.stash:
        return
    started = session.config.stash[_STARTED]
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if path.stat().st_mtime >= started:
                path.unlink()
        except OSError:
            pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the files that hold ``slow`` tests first, each file's tests staying in their order.

    pytest-xdist (``--dist loadfile``) hands whole files to the workers in this order; a
    minutes-long file handed out last would leave the other worker idle at the end.
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session")
def stand_in_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real DeepSpeed checkpoints of the stand-in models, made once for every test that reads them.

    ``point`` ZeRO-1 pointwise, ``context`` ZeRO-0 context, ``patch`` ZeRO-1 patch-mode pointwise
    (32 px), ``point3`` ZeRO-3 pointwise: 3 classes, 3 uint8 bands, the band statistics
    ``STAND_IN_MEAN``/``STAND_IN_STD``, written by ``tests.engine.test_predict_helpers.make_checkpoints``
    in one child process. Tests read them and must not change them (copy a run to damage it).
    """
    from tests.engine.test_predict_helpers import make_checkpoints

    root = tmp_path_factory.mktemp("stand_in_checkpoints")
    point = dict(name="pointnet", num_classes=3, in_channels=3)
    configs = {
        "point": (point, 1),
        "context": (dict(name="contextnet", num_classes=3, in_channels=3), 0),
        "patch": (dict(point, mode="patch", patch_size=32), 1),
        "point3": (point, 3),
    }
    make_checkpoints([dict(run_dir=str(root / name), config=config, stage=stage, input_dtype="uint8",
                           band_mean=STAND_IN_MEAN, band_std=STAND_IN_STD) for name, (config, stage) in configs.items()])
    return {name: root / name for name in configs}
