"""Shared test settings: keep every test on the CPU accelerator; leave no DeepSpeed buffers behind."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

# DeepSpeed probes for an accelerator at import; on CPU-only machines say so up front.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _build_deepspeed_cpu_ops() -> None:
    """JIT-build DeepSpeed's CPU ops once, in this process, before any test starts a child.

    Many tests start DeepSpeed in subprocesses, and the benchmark harness kills children that pass
    their memory cap or time limit. A child killed while it holds torch's extension build lock
    (``~/.cache/torch_extensions/.../lock``) leaves the lock behind and every later build waits on
    it forever; building here first means children only load the cached library.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return
    for builder_name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        builder = accelerator.create_op_builder(builder_name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)


@pytest.fixture(autouse=True, scope="session")
def _remove_deepspeed_shared_memory() -> Iterator[None]:
    """Unlink the /dev/shm all-reduce buffers that tests calling DeepSpeed directly created.

    The engine unlinks its own (``lrss_ds.engine.setup.release_shared_memory_name``); tests
    that call ``deepspeed.initialize`` themselves would otherwise leave 66 MB of RAM per rank.
    """
    started = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if path.stat().st_mtime >= started:
                path.unlink()
        except OSError:
            pass
