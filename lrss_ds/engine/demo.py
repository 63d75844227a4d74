"""``lrss-ds demo``, the main job: synthesize scenes, ingest them, train EHSNet under the real
``deepspeed`` launcher with ZeRO-Offload and checkpointing on CPU, and print the evaluation.

Everything goes under one directory (default ``./demo``): ``store_raw/`` (synthetic GeoTIFFs),
``store/`` (the Zarr tile store; reused by a rerun) and ``run/`` (resolved config, ``log.txt``,
``metrics.json``, ``checkpoints/``, ``monitor/``; replaced by a rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lrss_ds
from lrss_ds.engine.rendezvous import free_port
from lrss_ds.errors import ConfigError, TrainingError

REPO = Path(lrss_ds.__file__).resolve().parents[1]
EXPERIMENT = REPO / "ds_configs" / "ehsnet_synthetic.yaml"


def deepspeed_command(
    config: str | Path, ranks: int, extra: list[str], port: int | None = None, resume: bool = False
) -> list[str]:
    """The ``deepspeed`` launcher command line that trains ``config`` on ``ranks`` local ranks.

    On the CPU accelerator ``--num_gpus N`` starts N processes on this host (the launcher counts
    NUMA nodes as devices, but an explicit ``--num_gpus`` wins); they talk gloo on loopback.

    Args:
        config: experiment YAML.
        ranks: processes on this host.
        extra: arguments after ``--config`` (``--output DIR``, ``key=value`` overrides).
        port: rendezvous port (default: a free one).
        resume: add ``--resume``.

    Returns:
        argv for ``subprocess``.
    """
    launcher = Path(sys.executable).with_name("deepspeed")
    program = str(launcher) if launcher.exists() else (shutil.which("deepspeed") or "deepspeed")
    command = [
        program, "--num_gpus", str(ranks), "--master_port", str(port or free_port()), "--log_level", "warning",
        "--module", "lrss_ds.train", "--config", str(config),
    ]
    return command + (["--resume"] if resume else []) + list(extra)


def launcher_env() -> dict[str, str]:
    """Environment for the launched ranks: the package importable, the CPU accelerator if no GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_gpu = False
    if not has_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO calls a torch collective that torch now marks deprecated, once per step.
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--output``, ``--ranks`` and extra ``key=value`` overrides."""
    parser.add_argument("--output", default="demo", type=Path, help="directory for everything (default ./demo)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks started by the deepspeed launcher (default 1)")
    parser.add_argument("--config", type=Path, default=EXPERIMENT, help="experiment YAML (default: the main job's)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.iterations=20")


def run(args: argparse.Namespace) -> int:
    """Prepare the store, launch training, print the evaluation.

    Returns:
        The launcher's exit status (0 on success).

    Raises:
        ConfigError: a bad experiment YAML or override.
        TrainingError: the launched training failed.
    """
    from lrss_ds.engine.config import load_config
    from lrss_ds.engine.synthetic_store import prepare_synthetic_store

    out: Path = args.output
    if args.ranks < 1:
        raise ConfigError("--ranks", "must be at least 1")
    overrides = [f"data.store={out / 'store'}", f"train.output={out / 'run'}", *args.overrides]
    config = load_config(args.config, overrides)
    if config.data.synthetic is None:
        raise ConfigError(f"{args.config}: data.synthetic", "the demo needs an experiment with synthetic data")
    started = time.perf_counter()
    print(f"[demo] 1/3 synthetic scenes -> tile store {config.data.store}", flush=True)
    prepare_synthetic_store(config.data, log=lambda line: print(f"[demo]   {line}", flush=True))
    run_dir = Path(config.train.output)
    if run_dir.exists():
        print(f"[demo] replacing the previous demo run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    command = deepspeed_command(args.config, args.ranks, overrides)
    print(f"[demo] 2/3 training: {' '.join(command)}", flush=True)
    status = subprocess.call(command, env=launcher_env())
    if status != 0:
        raise TrainingError(run_dir, f"the deepspeed launcher exited with status {status}; see {run_dir / 'log.txt'}")
    print(f"[demo] 3/3 evaluation of {run_dir} ({time.perf_counter() - started:.0f} s in all)", flush=True)
    print(format_report(json.loads((run_dir / "metrics.json").read_text())), flush=True)
    print(
        f"[demo] next: lrss-ds evaluate --checkpoint {run_dir} --store {config.data.store} --split "
        f"{config.data.val_split} --output {out / 'report'}",
        flush=True,
    )
    return 0


def format_report(metrics: dict) -> str:
    """A short table of the final evaluation in ``metrics.json``: per-class IoU and F1, mIoU, OA."""
    final = metrics.get("final") or {}
    lines = [
        f"iterations {metrics['iteration']} on {metrics['world_size']} rank(s) in {metrics['seconds']:.0f} s; "
        f"loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}; peak RSS "
        f"{metrics['memory']['peak_rss_gib']:.2f} GiB (rank 0)",
    ]
    if final:
        lines.append(f"{'class':<12}{'IoU':>8}{'F1':>8}")
        for name, iou, f1 in zip(final["classes"], final["iou"], final["f1"]):
            fmt = lambda v: f"{v:8.3f}" if v is not None and v == v else f"{'-':>8}"  # noqa: E731
            lines.append(f"{name:<12}{fmt(iou)}{fmt(f1)}")
        lines.append(f"{'mIoU':<12}{final['miou']:8.3f}   mean F1 {final['mean_f1']:.3f}   OA {final['oa']:.3f}")
    return "\n".join(lines)
