"""One holistic whole-scene EHSNet training step (forward, backward, ZeRO-Offload step): peak RSS and time.

Each precision runs in a fresh Python process (so one run's heap never colours the next), as
a single DeepSpeed rank on the node's accelerator (the CPU one only where no GPU is present;
the record names it): ZeRO-2 with the optimizer offloaded to the host
(``DeepSpeedCPUAdam``), the model prepared with a memory preset of ``lrss_ds.memory``. The step
is the trainer's (``lrss_ds.engine.trainer.train_step``) on an engine built by the trainer's
set-up (``lrss_ds.engine.setup.build_step_parts``); its phases are timed around it
(``lrss_ds.engine.step_phases``). The scene is synthetic (uint8 bands, blocky labels) at the size of a whole FBP
scene, 4 x 6908 x 7300.

Usage::

    python benchmarks/fullscene_train.py                          # bf16 then fp32, full size
    python benchmarks/fullscene_train.py --size 2048x2048 --out /tmp/fs.json

The parent waits until ``--need-gib`` + 3 GiB are available before starting each run (the
machine is shared), writes ``benchmarks/results/fullscene_train.json`` (the first run's record
at the top level plus ``runs``: every record) and a Markdown note beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python benchmarks/fullscene_train.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._harness import (  # noqa: E402
    ALLOCATOR_ENV,
    benchmark_parser,
    machine_header,
    parse_benchmark_args,
    write_json_and_markdown,
)

from lrss_ds.units import GIB  # noqa: E402
RESULTS = REPO_ROOT / "benchmarks" / "results" / "fullscene_train.json"
PRESETS = {"bf16": "fullres_bf16", "fp32": "fullres_fp32"}
TARGET_GIB = {"bf16": 10.0, "fp32": 20.0}


# --- the child: one training step ---------------------------------------------------------


def _synthetic_scene(bands: int, height: int, width: int, classes: int, seed: int) -> tuple[Any, Any]:
    """``image (1, C, H, W)`` uint8 and ``label (1, H, W)`` uint8 of blocky class regions."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (1, 1, max(1, height // 64), max(1, width // 64)), generator=gen)
    label = F.interpolate(coarse.float(), size=(height, width), mode="nearest")[0, 0].to(torch.uint8)[None]
    image = torch.randint(0, 256, (1, bands, height, width), dtype=torch.uint8, generator=gen)
    return image, label


def _experiment(args: argparse.Namespace) -> Any:
    """The experiment the step trains: EHSNet, the memory preset, ``ds_configs/cpu.json`` without monitors.

    ``cpu.json`` is ZeRO-2 with the optimizer offloaded to the host; the trainer's AdamW
    becomes ``DeepSpeedCPUAdam`` there (``lrss_ds.engine.setup.build_optimizer``).
    """
    from lrss_ds.engine.config import (
        DeepSpeedConfigRef,
        ExperimentConfig,
        LossConfig,
        MemoryConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )

    return ExperimentConfig(
        model=ModelConfig(name="ehsnet", options={"dw_method": args.dw_method}),
        memory=MemoryConfig(preset=args.preset),
        loss=LossConfig(name="ehsnet"),
        optim=OptimConfig(type="adamw", lr=1e-4),
        deepspeed=DeepSpeedConfigRef(config=str(REPO_ROOT / "ds_configs" / "cpu.json"),
                                     override={"csv_monitor": {"enabled": False}, "tensorboard": {"enabled": False}}),
        train=TrainConfig(output=tempfile.gettempdir()),
    )


def run_step(args: argparse.Namespace) -> dict[str, Any]:
    """Build EHSNet and its engine with the trainer's set-up, then time ``args.steps`` trainer steps.

    Returns:
        the record: sizes, mode, accelerator, peak RSS (``ru_maxrss``), the accelerator's peak
        allocated/reserved bytes (``None`` on the CPU accelerator), step seconds and their phases.
    """
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from lrss_ds.data.catalog import get_dataset
    from lrss_ds.engine.setup import accelerator_summary, build_step_parts, init_distributed, load_deepspeed_json
    from lrss_ds.engine.step_phases import PhasePeaks, step_phases
    from lrss_ds.engine.trainer import train_step
    from lrss_ds.memory.device_sim import DeviceMemorySimulator, simulating
    from lrss_ds.models import build_model

    started = time.perf_counter()
    init_distributed()  # one rank on a free loopback port, the accelerator's backend
    spec = get_dataset("fbp")
    classes = len(spec.classes)
    torch.manual_seed(0)
    dw_method = args.dw_method
    model = build_model(
        "ehsnet", num_classes=classes, in_channels=args.bands, band_mean=[100.0] * args.bands,
        band_std=[50.0] * args.bands, dw_method=dw_method,
    )
    model.train()
    config = _experiment(args)
    ds_config = load_deepspeed_json(config)
    t_build = time.perf_counter()
    # the memory preset prepares the model, then DeepSpeedCPUAdam (JIT-built on first use) and the engine
    parts = build_step_parts(model, config, ds_config, classes, spec.ignore_index)
    init_seconds = time.perf_counter() - t_build
    engine, mode = parts.engine, parts.memory_mode
    image, label = (t.to(engine.device) for t in _synthetic_scene(args.bands, args.height, args.width, classes, 1))
    accelerator = get_accelerator()
    on_device = accelerator.device_name() != "cpu"
    if on_device:
        accelerator.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    # The first step runs under the device simulation. Its cost is per operation, not per pixel
    # (a few seconds at any size); with --steps 2 the reported (last) step is timed without it.
    simulator = DeviceMemorySimulator(engine) if args.simulate_device else None
    steps = []
    process_peak_bytes = 0
    allocated: list[int] = []  # the accelerator's peaks per phase (reset at each phase)
    reserved: list[int] = []
    simulated_device = simulated_host = None
    for index in range(args.steps):
        phases = PhasePeaks(engine.device)
        phases.begin_step(simulator if index == 0 else None)
        with simulating(phases.simulator), step_phases(engine, phases):
            loss = train_step(parts, {"image": image, "label": label})
        process_peak_bytes = max(process_peak_bytes, phases.process_peak())
        allocated += phases.accelerator_bytes.values()
        reserved += phases.accelerator_reserved_bytes.values()
        if phases.simulator is not None:
            simulated_device = max([simulator.peak_device_bytes, *phases.simulated_device_bytes.values()])
            simulated_host = max([simulator.peak_host_bytes, *phases.simulated_host_bytes.values()])
        steps.append(
            {
                "loss": math.nan if loss is None else loss,
                "forward_loss_seconds": round(phases.seconds.get("forward", math.nan), 2),
                "backward_seconds": round(phases.seconds.get("backward", math.nan), 2),
                "optimizer_step_seconds": round(phases.seconds.get("step", math.nan), 2),
                "step_seconds": round(sum(phases.seconds.values()), 2),
                "phase_peak_rss_gib": {k: round(v / GIB, 3) for k, v in phases.rss_bytes.items()},
                "phase_simulated_device_gib": {k: round(v / GIB, 3) for k, v in phases.simulated_device_bytes.items()},
                "ledger_peak_device_gib": round(parts.ledger.peak_device_bytes / GIB, 3),
                "ledger_peak_offloaded_gib": round(parts.ledger.peak_offloaded_bytes / GIB, 3),
            }
        )
    peak_rss_gib = max(process_peak_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / GIB
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    device_peaks = {
        "device_peak_allocated_gib": round(max([accelerator.max_memory_allocated(), *allocated]) / GIB, 3)
        if on_device else None,
        "device_peak_reserved_gib": round(max([accelerator.max_memory_reserved(), *reserved]) / GIB, 3)
        if on_device else None,
    }
    return {
        "model": "ehsnet",
        "backbone": "hrnet_w18",
        "output_stride": model.output_stride,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_classes": classes,
        "height": args.height,
        "width": args.width,
        "bands": args.bands,
        "dtype": "bf16" if mode.bf16 else "fp32",
        "memory_mode": args.preset,
        "memory_mode_fields": mode.to_dict(),
        "dw_method": dw_method,
        "peak_rss_gib": round(peak_rss_gib, 3),
        **device_peaks,
        # what a GPU run of this step would allocate on the card (lrss_ds.memory.device_sim): the
        # counterpart of max_memory_allocated, without CUDA context, fragmentation and workspaces
        "simulated_device_peak_gib": None if simulated_device is None else round(simulated_device / GIB, 3),
        "simulated_host_peak_gib": None if simulated_host is None else round(simulated_host / GIB, 3),
        "rss_before_step_gib": round(rss_before, 3),
        "step_seconds": steps[-1]["step_seconds"],
        "steps": steps,
        "loss_finite": all(s["loss"] == s["loss"] and abs(s["loss"]) != float("inf") for s in steps),
        "batchnorm_stats_dtype": str(bn.running_mean.dtype),
        "setup_seconds": round(t_build - started, 2),
        "deepspeed_init_seconds": round(init_seconds, 2),
        "optimizer": f"{type(engine.basic_optimizer).__name__} (ZeRO-2, offload_optimizer cpu)",
        "ds_config": ds_config,
        "device": str(engine.device),
        "accelerator": accelerator_summary(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "torch_threads": torch.get_num_threads(),
        "allocator_env": {k: os.environ.get(k, "default") for k in ALLOCATOR_ENV},
    }


# --- the parent: fresh processes, memory gate, results ------------------------------------


def _available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


def _wait_for_memory(need_gib: float, max_wait_s: float) -> float:
    """Block until ``need_gib`` + 3 GiB are available (others share the machine)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        available = _available_gib()
        if available >= need_gib + 3.0:
            return available
        if time.monotonic() > deadline:
            raise SystemExit(f"fullscene_train: only {available:.1f} GiB available, need {need_gib + 3:.1f}; gave up")
        print(f"waiting: {available:.1f} GiB available, need {need_gib + 3:.1f}", flush=True)
        time.sleep(30)


def _run_child(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    need = args.need_gib if args.need_gib is not None else TARGET_GIB[precision]
    available = _wait_for_memory(need, args.max_wait)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--preset", args.preset or PRESETS[precision],
        "--size", f"{args.height}x{args.width}", "--bands", str(args.bands), "--steps", str(args.steps),
        "--dw-method", args.dw_method,
    ] + ([] if args.simulate_device else ["--no-simulate-device"])
    from lrss_ds.engine.demo import launcher_env

    env = launcher_env()  # the CPU accelerator only where this node has no GPU
    if not args.default_allocator:
        env.update(ALLOCATOR_ENV)
    print(f"[{precision}] {' '.join(cmd[2:])} (available {available:.1f} GiB)", flush=True)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"fullscene_train: the {precision} run failed with exit code {done.returncode}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["process_seconds"] = round(time.perf_counter() - started, 1)
    record["available_gib_at_start"] = round(available, 1)
    record["target_peak_rss_gib"] = TARGET_GIB[record["dtype"]]
    full_scene = (record["height"], record["width"]) == (6908, 7300)
    # the targets are for the whole scene: at another size there is nothing to judge
    record["meets_target"] = record["peak_rss_gib"] <= record["target_peak_rss_gib"] if full_scene else None
    record["load_at_start"] = [round(x, 2) for x in os.getloadavg()]
    record["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(
        f"[{precision}] peak RSS {record['peak_rss_gib']:.2f} GiB, step {record['step_seconds']:.1f} s, "
        f"loss {record['steps'][-1]['loss']:.4f}",
        flush=True,
    )
    return record


def _accelerator(record: dict[str, Any]) -> dict[str, Any]:
    """The accelerator a record ran on (records written before it was recorded ran on the CPU one)."""
    return record.get("accelerator") or {"name": "cpu", "device": "cpu", "backend": "gloo", "device_model": None}


def _markdown(records: list[dict[str, Any]], header: dict[str, Any]) -> str:
    accel = _accelerator(records[0])
    gpu = accel["device_model"] or "no GPU"
    lines = [
        f"# Whole-scene EHSNet training step on {accel['name'].upper()}",
        "",
        "One holistic training step of EHSNet-W18 (output stride 8) on a whole "
        f"{records[0]['bands']} x {records[0]['height']} x {records[0]['width']} scene — forward, backward and "
        "the ZeRO-Offload optimizer step (ZeRO-2, `offload_optimizer` cpu, DeepSpeedCPUAdam) — "
        f"as one DeepSpeed rank on the {accel['name']} accelerator ({accel['device']}, backend {accel['backend']}), "
        "each precision in a fresh process.",
        "Reproduce: `python benchmarks/fullscene_train.py` (sizes: `--size HxW`).",
        "",
        "| dtype | memory preset | peak RSS GiB | simulated device peak GiB | target GiB | step s | fwd+loss s | "
        "bwd s | opt. step s | saved-tensor peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        s = r["steps"][-1]
        lines.append(
            f"| {r['dtype']} | `{r['memory_mode']}` | {r['peak_rss_gib']:.2f} | "
            f"{_simulated_cell(r.get('simulated_device_peak_gib'))} | {r['target_peak_rss_gib']:.0f} | "
            f"{s['step_seconds']:.1f} | {s['forward_loss_seconds']:.1f} | {s['backward_seconds']:.1f} | "
            f"{s['optimizer_step_seconds']:.1f} | {s['ledger_peak_device_gib']:.2f} |"
        )
    lines += [
        "",
        "## Conditions",
        f"- Machine: {header['cpu']}, {header['logical_cores']} logical cores, {header['ram_gib']} GiB RAM, {gpu}; "
        f"torch {records[0]['torch']} ({records[0]['torch_threads']} threads), DeepSpeed {records[0]['deepspeed']}; "
        + ", ".join(f"{r['dtype']} run {r.get('date', header['date'])}" for r in records) + ".",
        f"- Allocator: `MALLOC_MMAP_THRESHOLD_={records[0]['allocator_env']['MALLOC_MMAP_THRESHOLD_']}` "
        "(glibc's default kept 1.5-1.7x the live tensor peak in the heap here).",
        "- The machine was shared with other jobs (load average at each start: "
        + ", ".join(f"{r['dtype']} {r['load_at_start']}" for r in records)
        + "); times are wall-clock of one step and would be shorter on an idle machine. "
        "Peak RSS is `ru_maxrss` of the training process (model, DeepSpeed, optimizer state, data, "
        "activations), which other jobs do not change.",
        "- Simulated device peak: the live tensor storages a GPU run of the same step (same JSON and memory "
        "preset; ZeRO-Offload's fp32 partitions and Adam states on the host) keeps on the card, followed over "
        "the first step by `lrss_ds.memory.device_sim`; the counterpart of `torch.cuda.max_memory_allocated`, "
        "without the CUDA context, allocator fragmentation and cuDNN workspaces.",
        "- Memory levers (`lrss_ds.memory` presets, each run's own fields): "
        + "; ".join(
            f"{r['dtype']}: checkpointing `{r['memory_mode_fields']['checkpointing']}`, loss in bands of "
            f"{r['memory_mode_fields']['loss_band_rows']} rows, stem in bands of "
            f"{r['memory_mode_fields'].get('stem_band_rows') or 'no'} rows"
            for r in records
        )
        + " (the uint8 input normalised inside the first checkpoint; channels-last; the LRD checkpointed "
        "term by term; 1x1 convolutions past 64 MiB as matrix products); bf16 = `torch.autocast` bf16 over "
        "float32 weights, so gradients, optimizer state and "
        f"BatchNorm running statistics stay float32 (checked: {records[0]['batchnorm_stats_dtype']}).",
        "- Data: synthetic uint8 bands and blocky labels of the FBP class count "
        f"({records[0]['num_classes']} classes, ignore 255); the loss is the EHSNet loss (BAE-weighted CE + 0.4 aux).",
        "- Convolutions whose input or output passes 2 GiB (in fp32: the stem's 64-channel map at half "
        "resolution, 3.2 GB) run in row bands (`lrss_ds.memory.large_conv`): past 2 GiB oneDNN computes the weight "
        "gradient with its reference kernel, and the first fp32 attempt sat in it for over 25 minutes.",
        "- DeepSpeedCPUAdam is JIT-built on first use (about 140 s from a clean cache); that is outside the step time.",
    ]
    return "\n".join(lines) + "\n"


def _simulated_cell(gib: float | None) -> str:
    """The simulated device peak as a table cell, labelled; runs without it say so."""
    return "not simulated" if gib is None else f"{gib:.2f} (simulated)"


def _read_merge(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--merge`` file, checked to hold runs of the same model and scene size."""
    try:
        earlier = json.loads(args.merge.read_text())
        runs = earlier["runs"]
        earlier["date"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"fullscene_train: --merge {args.merge}: not a fullscene_train result ({error})")
    for run in runs:
        if (run["height"], run["width"], run["bands"]) != (args.height, args.width, args.bands):
            raise SystemExit(
                f"fullscene_train: --merge {args.merge}: its {run['dtype']} run is {run['bands']}x{run['height']}x"
                f"{run['width']}, not {args.bands}x{args.height}x{args.width}"
            )
    return earlier




def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (parent) or one step (``--child``); returns the exit code."""
    parser = benchmark_parser(__doc__.splitlines()[0], out=RESULTS,
                              out_help="result JSON path (the Markdown note is written beside it)")
    parser.add_argument("--size", default="6908x7300", help="HxW of the scene (default: a whole FBP scene)")
    parser.add_argument("--bands", type=int, default=4)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=sorted(PRESETS))
    parser.add_argument("--preset", default=None, help="memory preset (default: fullres_bf16 / fullres_fp32)")
    parser.add_argument("--steps", type=int, default=1, help="steps per run; the last one is reported")
    parser.add_argument("--dw-method", default="auto", help="EHSNet's depth-wise conv method (auto/direct/fast)")
    parser.add_argument("--need-gib", type=float, default=None, help="memory to wait for (default: the target)")
    parser.add_argument("--max-wait", type=float, default=3600.0, help="seconds to wait for free memory")
    parser.add_argument("--default-allocator", action="store_true", help="do not set MALLOC_MMAP_THRESHOLD_")
    parser.add_argument("--no-simulate-device", dest="simulate_device", action="store_false",
                        help="skip the simulated device peak (lrss_ds.memory.device_sim) of the first step")
    parser.add_argument("--merge", type=Path, default=None,
                        help="keep this earlier result file's runs of the precisions not run now")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parse_benchmark_args(parser, argv)
    args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    if args.child:
        print(json.dumps(run_step(args)), flush=True)
        return 0
    earlier = _read_merge(args) if args.merge else None  # a bad file must fail before the long runs
    records = [_run_child(args, precision) for precision in args.precision]
    if earlier is not None:
        kept = [dict(r, date=r.get("date", earlier["date"])) for r in earlier.get("runs", [])
                if r["dtype"] not in args.precision]
        for record in kept:  # the ZeRO JSON is the same for every precision; records carry it
            record.setdefault("ds_config", earlier.get("ds_config"))
        records = sorted(kept + records, key=lambda r: ["bf16", "fp32"].index(r["dtype"]))
    conditions = f"whole-scene step at {args.height}x{args.width}, precisions {args.precision}"
    header = machine_header(f"{conditions}. {args.conditions}" if args.conditions else conditions)
    write_results(records, header, args.out)
    return 0


def write_results(records: list[dict[str, Any]], header: dict[str, Any], out: Path) -> None:
    """Write the JSON (first record at the top level, every record under ``runs``) and the note."""
    import deepspeed
    import torch

    result = {
        **{k: v for k, v in records[0].items() if k != "ds_config"},
        "date": header["date"],
        "cpu_model": header["cpu"],
        "logical_cores": header["logical_cores"],
        "ram_gib": header["ram_gib"],
        "header": header,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "ds_config": records[0]["ds_config"],
        "runs": [{k: v for k, v in r.items() if k != "ds_config"} for r in records],
    }
    write_json_and_markdown(out, result, _markdown(records, header))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    raise SystemExit(main())
