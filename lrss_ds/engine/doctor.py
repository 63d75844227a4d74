"""``lrss-ds doctor``: the preflight to run first on a node, ending in one PASS/FAIL verdict.

Checks, in order (each prints what it found; the first failure is named in the verdict):

1. ``versions``: Python, torch (and the CUDA it was built for), cuDNN, NCCL, DeepSpeed.
2. ``accelerator``: the accelerator, device and communication backend DeepSpeed picks here,
   and whether that is right for the node (a node with GPUs must not fall back to the CPU one
   unless ``DS_ACCELERATOR=cpu`` was set by the user, see ``launch/accelerator.sh``).
3. ``ops``: the DeepSpeed ops the project uses, compatible or not, prebuilt or JIT-built.
4. ``collective``: two ranks (one on a single-GPU node: NCCL cannot put two ranks on one
   device) in child processes on loopback all-reduce on the accelerator's devices with the real
   backend, as the trainer's collectives do.
5. ``training``: a few iterations of the demo experiment (``ds_configs/ehsnet_synthetic.yaml``
   with tiny scenes) under the ``deepspeed`` launcher on the node's devices, with one evaluation
   and one checkpoint; the run's own log must name the same accelerator.

Memory is reported per phase: the device peak of the collective ranks and the training run's
``metrics.json`` memory figures (device figures where an accelerator exists, host RSS always).
On a CPU-only node every check runs on DeepSpeed's CPU accelerator and the verdict says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lrss_ds.engine.demo import EXPERIMENT, deepspeed_command, launcher_env
from lrss_ds.engine.rendezvous import free_port

# Builder class -> why the project needs it. ``required`` ops must be usable on this node.
OPS: dict[str, tuple[str, bool]] = {
    "CPUAdamBuilder": ("DeepSpeedCPUAdam, the optimizer step of ZeRO-Offload (the demo and FBP JSONs)", True),
    "FusedAdamBuilder": ("fused Adam on the device (JSONs without offload may use it)", False),
    "AsyncIOBuilder": ("NVMe offload (not used by the shipped JSONs)", False),
    "ShareMemCommBuilder": ("the CPU accelerator's shared-memory all-reduce", False),
}
# The demo experiment shrunk to a preflight: 2 scenes of 128 px, a slim LRD, one evaluation and
# one checkpoint at the last iteration.
TINY_OVERRIDES = [
    "data.synthetic.height=128", "data.synthetic.width=128", "data.synthetic.train_scenes=2",
    "data.synthetic.val_scenes=1", "model.options.lrd_k=16", "model.options.lrd_d=16",
    "schedule.warmup_iters=1",
]
CHECKS = ("versions", "accelerator", "ops", "collective", "training")


@dataclass
class CheckResult:
    """What one check found.

    Attributes:
        name: the check (one of ``CHECKS``).
        ok: it passed.
        lines: what it found, printed under its name.
        reason: one line saying why it failed (empty when ``ok``).
        data: figures other checks or the verdict use.
    """

    name: str
    ok: bool
    lines: list[str] = field(default_factory=list)
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--ranks``, ``--iterations``, ``--timeout``, ``--workdir``, ``--keep`` and ``--skip``."""
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks of the training check (default: every GPU of the node; 1 on CPU)")
    parser.add_argument("--iterations", type=int, default=3, help="training iterations (default 3)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds allowed to the collective and to the training run each (default 900)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the training check's store and run (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the training check's folder after a pass")
    parser.add_argument("--skip", nargs="*", default=[], choices=CHECKS, metavar="CHECK",
                        help=f"checks not to run ({', '.join(CHECKS)})")


def run(args: argparse.Namespace) -> int:
    """Run the checks not skipped, print each and the verdict; 0 when all passed, else 1."""
    checks = {"versions": check_versions, "accelerator": check_accelerator, "ops": check_ops,
              "collective": check_collective, "training": check_training}
    return run_checks([(name, checks[name]) for name in CHECKS if name not in args.skip], args)


def run_checks(checks: list[tuple[str, Callable[[argparse.Namespace], CheckResult]]],
               args: argparse.Namespace) -> int:
    """Run ``checks`` in order, print their findings and a one-line verdict.

    A check that raises fails with the exception as its reason; the others still run, so one
    report shows everything that is wrong.

    Returns:
        0 when every check passed, 1 otherwise.
    """
    results = []
    for name, check in checks:
        started = time.perf_counter()
        try:
            result = check(args)
        except Exception as error:  # noqa: BLE001 - a broken check is a failed check, said in one line
            result = CheckResult(name, False, reason=f"{type(error).__name__}: {error}")
        seconds = time.perf_counter() - started
        print(f"[doctor] {name}: {'ok' if result.ok else 'FAILED'} ({seconds:.0f} s)", flush=True)
        for line in result.lines + ([] if result.ok else [f"failed: {result.reason}"]):
            print(f"[doctor]   {line}", flush=True)
        results.append(result)
    print(verdict(results), flush=True)
    return 0 if results and all(r.ok for r in results) else 1


def verdict(results: list[CheckResult]) -> str:
    """The last line: ``PASS`` with the accelerator checked, or ``FAIL`` naming the failed checks."""
    from lrss_ds.engine.setup import accelerator_summary

    failed = [r for r in results if not r.ok]
    if failed:
        return "doctor: FAIL: " + "; ".join(f"{r.name}: {r.reason}" for r in failed)
    if not results:
        return "doctor: FAIL: no check was run"
    accel = accelerator_summary()
    where = f"the {accel['name']} accelerator ({accel['device']}, backend {accel['backend']})"
    ran = ", ".join(r.name for r in results)
    if accel["name"] == "cpu":
        return f"doctor: PASS: {ran} on {where}; CPU only, no GPU was checked"
    return f"doctor: PASS: {ran} on {where}"


def check_versions(args: argparse.Namespace) -> CheckResult:
    """Python, torch, CUDA, cuDNN, NCCL and DeepSpeed versions (fails only when DeepSpeed cannot load)."""
    import platform

    import torch

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return CheckResult("versions", False, [f"torch {torch.__version__}"], f"DeepSpeed does not import: {error}")
    cuda = torch.cuda.is_available()
    nccl = "n/a (no CUDA device)"
    if cuda:
        version = torch.cuda.nccl.version()  # a tuple in torch 2.x, an int in older releases
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    cudnn = torch.backends.cudnn.version() if cuda else None
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__} (built for CUDA {torch.version.cuda}), "
        f"DeepSpeed {ds_version}",
        f"CUDA devices visible to torch: {torch.cuda.device_count() if cuda else 0}; cuDNN {cudnn or 'n/a'}; "
        f"NCCL {nccl}",
    ]
    return CheckResult("versions", True, lines)


def gpu_hardware_present() -> bool:
    """Whether this node has NVIDIA GPUs, asked of ``nvidia-smi`` and ``/dev`` (not of torch)."""
    from lrss_ds.engine.isolated import has_cuda_cheap

    if has_cuda_cheap():
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return listing.returncode == 0 and any(line.startswith("GPU ") for line in listing.stdout.splitlines())


def check_accelerator(args: argparse.Namespace) -> CheckResult:
    """The accelerator, device and backend DeepSpeed picks; wrong when a GPU node falls back to the CPU.

    ``DS_ACCELERATOR=cpu`` marked by ``launch/env.sh`` as its own choice
    (``LRSS_DS_AUTO_ACCELERATOR``) counts as a fallback; set by the user, it is respected.
    """
    from deepspeed.accelerator import get_accelerator

    from lrss_ds.engine.setup import accelerator_summary

    accel = accelerator_summary()
    hardware = gpu_hardware_present()
    lines = [
        f"DeepSpeed picks the {accel['name']} accelerator: device {accel['device']}"
        + (f" ({accel['device_model']})" if accel["device_model"] else "")
        + f", {get_accelerator().device_count()} device(s), backend {accel['backend']}",
        f"DS_ACCELERATOR={accel['DS_ACCELERATOR']}; "
        f"GPUs on this node (nvidia-smi, /dev): {'yes' if hardware else 'no'}",
    ]
    if accel["name"] == "cpu" and hardware:
        env_chosen = os.environ.get("LRSS_DS_AUTO_ACCELERATOR") == os.environ.get("DS_ACCELERATOR")
        if accel["DS_ACCELERATOR"] == "cpu" and not env_chosen:
            lines.append("this node has GPUs; running on the CPU because DS_ACCELERATOR=cpu was set")
            return CheckResult("accelerator", True, lines, data=accel)
        why = ("DS_ACCELERATOR=cpu came from launch/env.sh on another machine; unset it"
               if accel["DS_ACCELERATOR"] == "cpu" else "torch sees no CUDA device (a CPU build of torch?)")
        return CheckResult("accelerator", False, lines, f"this node has GPUs but DeepSpeed picks the CPU: {why}", accel)
    if accel["name"] == "cpu":
        lines.append("no GPU on this node: every check runs on DeepSpeed's CPU accelerator")
    return CheckResult("accelerator", True, lines, data=accel)


def check_ops(args: argparse.Namespace) -> CheckResult:
    """DeepSpeed ops the project uses on this accelerator: compatible, prebuilt or left to the JIT build."""
    from deepspeed.accelerator import get_accelerator

    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    lines, missing = [], []
    for builder_name, (purpose, required) in OPS.items():
        try:
            builder = get_accelerator().create_op_builder(builder_name)
            compatible = builder is not None and bool(builder.is_compatible(verbose=False))
            name = builder.NAME if builder is not None else builder_name
        except Exception:  # noqa: BLE001 - an accelerator without this builder
            compatible, name = False, builder_name
        if not compatible and required:
            missing.append(name)
        built = "prebuilt" if installed_ops.get(name) else "JIT-built on first use"
        lines.append(f"{name}: {'compatible, ' + built if compatible else 'not compatible'} - {purpose}")
    jit_tools = [tool for tool in ("ninja", "c++") if shutil.which(tool) is None
                 and not (tool == "ninja" and Path(sys.executable).with_name("ninja").exists())]
    lines.append("JIT build tools: " + ("ninja and c++ found" if not jit_tools else f"missing {', '.join(jit_tools)}"))
    if missing:
        return CheckResult("ops", False, lines, f"required op(s) not compatible here: {', '.join(missing)}")
    return CheckResult("ops", True, lines)


def collective_rank() -> None:
    """One rank of the collective check (run in a child process; prints a JSON line).

    Opens the process group as the trainer does (``init_distributed``: the accelerator's
    backend), all-reduces a float sum and an int32 max on this rank's accelerator device, and
    reports the backend, the device, the results and the device's peak bytes.
    """
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from lrss_ds.engine import comm
    from lrss_ds.engine.setup import init_distributed

    accelerator = get_accelerator()
    info = init_distributed()  # binds this rank's device first (setup.bind_local_device)
    device = accelerator.current_device_name()
    total = torch.full((1024,), float(info.rank + 1), device=device)
    total = comm.all_reduce(total)
    flag = torch.tensor([info.rank], dtype=torch.int32, device=device)
    flag = comm.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.barrier()
    on_device = accelerator.device_name() != "cpu"
    print(json.dumps({
        "rank": info.rank, "backend": dist.get_backend(), "device": str(total.device),
        "sum": float(total[0].item()), "sums_equal": bool((total == total[0]).all().item()), "max": int(flag.item()),
        "device_peak_allocated": accelerator.max_memory_allocated() if on_device else None,
        "device_peak_reserved": accelerator.max_memory_reserved() if on_device else None,
    }), flush=True)
    dist.destroy_process_group()


def _collective_ranks() -> int:
    """Ranks for the collective check: 2, or 1 on a node with a single GPU."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    return 2 if accelerator.device_name() == "cpu" or accelerator.device_count() >= 2 else 1


def check_collective(args: argparse.Namespace) -> CheckResult:
    """Two ranks on loopback all-reduce on the accelerator's devices with the real backend."""
    world = _collective_ranks()
    port = free_port()
    children = []
    for rank in range(world):
        env = dict(launcher_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-c", "from lrss_ds.engine.doctor import collective_rank; collective_rank()"]
        children.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports, errors = [], []
    deadline = time.monotonic() + args.timeout
    for rank, child in enumerate(children):
        try:
            out, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in children:
                other.kill()
                other.wait()
            return CheckResult("collective", False, reason=f"{world} ranks did not finish in {args.timeout:g} s")
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if child.returncode != 0 or not lines:
            errors.append(f"rank {rank} exited {child.returncode}: {_last_error(err)}")
        else:
            reports.append(json.loads(lines[-1]))
    if errors:
        return CheckResult("collective", False, reason="; ".join(errors))
    expected = world * (world + 1) / 2
    first = reports[0]
    lines = [f"{world} rank(s), backend {first['backend']}, devices {', '.join(r['device'] for r in reports)}: "
             f"all-reduce sum {first['sum']:g} (expected {expected:g}), max {first['max']} (expected {world - 1})"]
    lines += _device_memory_lines("collective", reports)
    wrong = [r["rank"] for r in reports
             if r["sum"] != expected or not r["sums_equal"] or r["max"] != world - 1]
    if wrong:
        return CheckResult("collective", False, lines, f"wrong all-reduce results on rank(s) {wrong}")
    if world == 1:
        lines.append("one GPU: a two-rank collective needs two devices (NCCL allows one rank per device)")
    return CheckResult("collective", True, lines, data={"backend": first["backend"]})


def _device_memory_lines(phase: str, reports: list[dict[str, Any]]) -> list[str]:
    """Per-rank device peaks of a phase, or the reason there are none."""
    if all(r["device_peak_allocated"] is None for r in reports):
        return [f"device memory ({phase}): n/a on the CPU accelerator"]
    return [f"device memory ({phase}), rank {r['rank']}: peak allocated {r['device_peak_allocated'] / 2**20:.1f} "
            f"MiB, reserved {r['device_peak_reserved'] / 2**20:.1f} MiB" for r in reports]


def _last_error(text: str) -> str:
    """The last non-empty line of a child's stderr (its exception, usually)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _training_ranks(args: argparse.Namespace) -> int:
    """Ranks of the training check: ``--ranks``, else every device of a GPU node, else 1."""
    from deepspeed.accelerator import get_accelerator

    if args.ranks is not None:
        return max(1, args.ranks)
    accelerator = get_accelerator()
    return 1 if accelerator.device_name() == "cpu" else max(1, accelerator.device_count())


def check_training(args: argparse.Namespace) -> CheckResult:
    """A few iterations of the demo experiment under the deepspeed launcher, one evaluation, one checkpoint."""
    from deepspeed.accelerator import get_accelerator

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lrss_ds_doctor_"))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    iterations = max(1, args.iterations)
    overrides = [f"data.store={workdir / 'store'}", f"train.output={run_dir}", f"train.iterations={iterations}",
                 f"train.eval_every={iterations}", f"train.checkpoint_every={iterations}", *TINY_OVERRIDES]
    ranks = _training_ranks(args)
    command = deepspeed_command(EXPERIMENT, ranks, overrides)
    log_path = workdir / "launcher.log"
    lines = [f"{ranks} rank(s): {' '.join(command)}", f"launcher output: {log_path}"]
    with open(log_path, "w") as log:
        try:
            status = subprocess.run(command, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            return CheckResult("training", False, lines, f"no result in {args.timeout:g} s; see {log_path}")
    if status != 0:
        tail = _last_error(log_path.read_text())
        return CheckResult("training", False, lines, f"the launcher exited {status} ({tail}); see {log_path}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run_log = (run_dir / "log.txt").read_text()
    # log.txt lines are "HH:MM:SS text"; the trainer names its accelerator in one of them
    texts = [line.split(" ", 1)[-1] for line in run_log.splitlines()]
    said = [text for text in texts if text.startswith("accelerator ")]
    miou = (metrics.get("final") or {}).get("miou")
    lines.append(f"{metrics['iteration']} iterations on {metrics['world_size']} rank(s), loss "
                 f"{metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}, val mIoU "
                 + ("not computed" if miou is None else f"{miou:.3f}"))
    lines.append("the run's log: " + (said[0] if said else "(no accelerator line)"))
    memory = metrics.get("memory", {})
    lines.append("memory over the run (rank 0, metrics.json): "
                 + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in memory.items()))
    expected = f"accelerator {get_accelerator().device_name()} "
    if metrics["iteration"] != iterations or not metrics.get("finished"):
        return CheckResult("training", False, lines, f"stopped at iteration {metrics['iteration']} of {iterations}")
    if miou is None:
        return CheckResult("training", False, lines, "the run did not evaluate")
    if not said or not said[0].startswith(expected):
        return CheckResult("training", False, lines, f"the run's log does not say it ran on the {expected.strip()}")
    if args.workdir is None and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return CheckResult("training", True, lines)
