"""The launch scripts decide the accelerator on the node that runs the ranks, not where env.sh ran.

The scripts run in bash subprocesses against stand-ins on PATH: ``nvidia-smi`` that lists GPUs
(a GPU node) or fails (a CPU node), ``srun``/``scontrol`` that run the task here, and ``python``
/ ``deepspeed`` that print the environment they were started with. ``LRSS_DS_DEV_DIR`` replaces
``/dev`` so that the machine running the tests cannot answer for the node.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
BASE_PATH = "/usr/bin:/bin"

PRINT_ENV = """#!/bin/bash
echo "DS_ACCELERATOR=${DS_ACCELERATOR-<unset>}"
echo "ARGS=$*"
[ -n "${DS_ENV_FILE:-}" ] && sed 's/^/ENV_FILE:/' "$DS_ENV_FILE" && echo "ENV_FILE_PATH=$DS_ENV_FILE"
exit 0
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _node(tmp_path: Path, name: str, gpus: int) -> dict[str, str]:
    """A node's PATH and /dev stand-ins: ``gpus`` GPUs listed by nvidia-smi (0: nvidia-smi fails)."""
    bin_dir, dev_dir = tmp_path / name / "bin", tmp_path / name / "dev"
    bin_dir.mkdir(parents=True)
    dev_dir.mkdir()
    (dev_dir / "nvidiactl").touch()  # the driver's node: present on CPU nodes with a driver too
    listing = "".join(f"echo 'GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})'\n" for i in range(gpus))
    _script(bin_dir / "nvidia-smi", "#!/bin/bash\n" + (listing or "echo 'NVIDIA-SMI has failed'; exit 9\n"))
    _script(bin_dir / "srun", '#!/bin/bash\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    _script(bin_dir / "scontrol", "#!/bin/bash\necho node0\n")
    _script(bin_dir / "python", PRINT_ENV)
    _script(bin_dir / "deepspeed", PRINT_ENV)
    return {"PATH": f"{bin_dir}:{BASE_PATH}", "LRSS_DS_DEV_DIR": str(dev_dir)}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _printed(done: subprocess.CompletedProcess, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith(key + "=")]


@pytest.fixture(scope="module")
def login_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment `bash launch/env.sh sbatch ...` hands to sbatch on a GPU-less login node."""
    tmp = tmp_path_factory.mktemp("login")
    node = _node(tmp, "login", gpus=0)
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True)
    # The venv's python is a real one (env.sh may ask it whether torch sees CUDA: here it does not).
    _script(venv / "bin" / "python", f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    # env.sh's stamp of an installed venv: the checkout, setup.cfg, pyproject.toml and env.sh itself
    stamp = f"{REPO}\n".encode() + b"".join((REPO / name).read_bytes() for name in ("setup.cfg", "pyproject.toml", "launch/env.sh"))
    (venv / ".lrss_ds-installed").write_text(hashlib.sha256(stamp).hexdigest() + "\n")
    env = {"HOME": str(tmp), "LRSS_DS_VENV": str(venv), "TORCH_EXTENSIONS_DIR": str(tmp / "ext"), **node}
    done = _run(["bash", str(LAUNCH / "env.sh"), "env"], env)
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert exported["DS_ACCELERATOR"] == "cpu"  # right for the login node itself
    return exported


def _slurm_env(inherited: dict[str, str], node: dict[str, str]) -> dict[str, str]:
    """What a task sees on the compute node: the forwarded environment, the node's PATH and /dev."""
    return {**inherited, **node, "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "node0",
            "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "1"}


def test_sbatch_from_a_cpu_login_node_trains_on_the_gpu_node(login_env: dict[str, str], tmp_path: Path) -> None:
    env = _slurm_env(login_env, _node(tmp_path, "gpu", gpus=4))
    done = _run(["bash", str(LAUNCH / "slurm.sbatch"), "exp.yaml", "--output", "runs/x"], env)
    assert _printed(done, "DS_ACCELERATOR") == ["<unset>"]  # DeepSpeed picks CUDA and NCCL there
    assert _printed(done, "ARGS") == ["-m lrss_ds.train --resume --config exp.yaml --output runs/x"]


def test_a_gpu_seen_only_as_a_later_device_node_counts(login_env: dict[str, str], tmp_path: Path) -> None:
    node = _node(tmp_path, "gpu", gpus=0)
    (Path(node["LRSS_DS_DEV_DIR"]) / "nvidia2").touch()  # the job's GPU; no /dev/nvidia0
    done = _run(["bash", str(LAUNCH / "slurm.sbatch"), "exp.yaml"], _slurm_env(login_env, node))
    assert _printed(done, "DS_ACCELERATOR") == ["<unset>"]


def test_sbatch_on_a_cpu_node_uses_the_cpu_accelerator(login_env: dict[str, str], tmp_path: Path) -> None:
    done = _run(["bash", str(LAUNCH / "slurm.sbatch"), "exp.yaml"], _slurm_env(login_env, _node(tmp_path, "c", 0)))
    assert _printed(done, "DS_ACCELERATOR") == ["cpu"]


def test_a_cpu_choice_the_user_made_is_kept_on_a_gpu_node_and_said(login_env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    user_env = {k: v for k, v in login_env.items() if k != "LRSS_DS_AUTO_ACCELERATOR"}  # set before env.sh
    done = _run(["bash", str(LAUNCH / "slurm.sbatch"), "exp.yaml"], _slurm_env(user_env, _node(tmp_path, "g", 2)))
    assert _printed(done, "DS_ACCELERATOR") == ["cpu"]
    assert "has GPUs, but DS_ACCELERATOR=cpu was set" in done.stderr


def _multi_node_env(inherited: dict[str, str], node: dict[str, str], tmp_path: Path) -> dict[str, str]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=4\n")
    return {**inherited, **node, "HOME": str(tmp_path), "TMPDIR": str(tmp_path), "HOSTFILE": str(hostfile),
            "NCCL_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "ib0"}


def test_multi_node_on_gpus_forwards_nccl_and_not_env_shs_cpu_choice(login_env: dict[str, str],
                                                                      tmp_path: Path) -> None:
    (tmp_path / ".deepspeed_env").write_text("MY_SETTING=1\n\n")  # the user's own file is kept
    env = _multi_node_env(login_env, _node(tmp_path, "gpu", gpus=8), tmp_path)
    done = _run(["bash", str(LAUNCH / "multi_node.sh"), "exp.yaml"], env)
    assert _printed(done, "DS_ACCELERATOR") == ["<unset>"]
    forwarded = [line for line in done.stdout.splitlines() if line.startswith("ENV_FILE:")]
    assert "ENV_FILE:NCCL_DEBUG=INFO" in forwarded and "ENV_FILE:NCCL_SOCKET_IFNAME=ib0" in forwarded
    assert "ENV_FILE:MY_SETTING=1" in forwarded
    assert not any(line.startswith("ENV_FILE:DS_ACCELERATOR") for line in forwarded)
    assert not Path(_printed(done, "ENV_FILE_PATH")[0]).exists()  # removed after the launcher ended


def test_multi_node_forwards_an_accelerator_the_user_chose(login_env: dict[str, str], tmp_path: Path) -> None:
    user_env = {k: v for k, v in login_env.items() if k != "LRSS_DS_AUTO_ACCELERATOR"}
    done = _run(["bash", str(LAUNCH / "multi_node.sh"), "exp.yaml"],
                _multi_node_env(user_env, _node(tmp_path, "cpu", gpus=0), tmp_path))
    assert "ENV_FILE:DS_ACCELERATOR=cpu" in done.stdout.splitlines()


def test_a_long_gpu_listing_is_read_whole_under_pipefail(login_env: dict[str, str], tmp_path: Path) -> None:
    # A listing longer than the pipe's buffer: a grep that quit at the first line would kill
    # nvidia-smi with SIGPIPE, and pipefail would turn that into "no GPU".
    node = _node(tmp_path, "many", gpus=3000)
    for _ in range(3):
        done = _run(["bash", str(LAUNCH / "slurm.sbatch"), "exp.yaml"], _slurm_env(login_env, node))
        assert _printed(done, "DS_ACCELERATOR") == ["<unset>"]
