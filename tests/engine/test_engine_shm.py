"""DeepSpeed's CPU all-reduce buffer must not outlive a run in /dev/shm."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrss_ds.engine.rendezvous import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm on this system")
def test_init_distributed_leaves_no_shared_memory_buffer_behind() -> None:
    port = free_port()
    script = (
        "import os, glob\n"
        "from lrss_ds.engine.setup import init_distributed\n"
        "init_distributed()\n"
        "os.kill(os.getpid(), 9)\n"  # die without any clean-up, as a killed rank would
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
    assert leftovers == []
