"""Time the LRD's depth-wise convolutions and the whole LRD module, plain vs fast method.

Usage::

    python benchmarks/lrd_kernels.py [--height 213 --width 225]
        [--channels 256] [--repeats 3] [--dtypes float32 bfloat16] [--out benchmarks/results]

The default feature size, 256 x 213 x 225, is 1/16 of the area of the stride-8 feature map
of a 6800x7200 FBP scene (256 x 850 x 900); time scales linearly with area for the direct
convolutions and as ``N log N`` for the FFT weight gradient, so the ratios carry over.
Each measurement is one warm-up then ``--repeats`` timed runs; the median and the minimum
are reported, with the 1-minute load average before and after (the machine is shared). The
tensors live on DeepSpeed's accelerator device (the CPU where no GPU is present); each timed
run ends with the accelerator's ``synchronize()`` so that queued device work is counted.
Writes ``lrd_kernels.json`` and ``lrd_kernels.md`` into ``--out``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import (  # noqa: E402
    benchmark_parser,
    machine_header,
    parse_benchmark_args,
    write_json_and_markdown,
    write_text_atomically,
)
from lrss_ds.models.large_kernel import depthwise_conv2d  # noqa: E402
from lrss_ds.models.lrd import LRDModule  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def device() -> torch.device:
    """The device DeepSpeed's accelerator computes on in this process."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def time_it(fn: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median and minimum wall seconds, and median process CPU seconds, of ``repeats`` runs.

    One warm-up run first. The CPU time (all threads of this process) is less disturbed than
    the wall time when other jobs compete for the cores.
    """
    from deepspeed.accelerator import get_accelerator

    sync = get_accelerator().synchronize
    fn()
    sync()
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"median_s": statistics.median(times), "min_s": min(times), "cpu_median_s": statistics.median(cpu), "runs": repeats}


def bench_depthwise(channels: int, height: int, width: int, kernel: int, dtype: torch.dtype, method: str, repeats: int) -> dict:
    """Forward and forward+backward of one depth-wise convolution."""
    torch.manual_seed(0)
    on = device()
    x = torch.randn(1, channels, height, width, dtype=dtype, device=on, requires_grad=True)
    weight = torch.randn(channels, 1, kernel, kernel, dtype=dtype, device=on, requires_grad=True)
    grad = torch.randn(1, channels, height, width, dtype=dtype, device=on)

    def forward() -> None:
        with torch.no_grad():
            depthwise_conv2d(x, weight, None, method)

    def train_step() -> None:
        depthwise_conv2d(x, weight, None, method).backward(grad)

    flops = 2.0 * channels * height * width * kernel * kernel
    fwd, both = time_it(forward, repeats), time_it(train_step, repeats)
    return {
        "kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "method": method,
        "fwd": fwd, "fwd_bwd": both,
        "fwd_gflops": flops / fwd["median_s"] / 1e9, "fwd_bwd_gflops": 3 * flops / both["median_s"] / 1e9,
    }


def bench_lrd(in_channels: int, channels: int, height: int, width: int, dtype: torch.dtype, method: str, channels_last: bool, repeats: int) -> dict:
    """Forward and forward+backward of the whole LRD module (train mode)."""
    torch.manual_seed(0)
    lrd = LRDModule(in_channels, k=channels, d=channels, dw_method=method).to(device(), dtype)
    x = torch.randn(1, in_channels, height, width, dtype=dtype, device=device(), requires_grad=True)
    if channels_last:
        lrd = lrd.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

    def forward() -> None:
        with torch.no_grad():
            lrd(x)

    def train_step() -> None:
        lrd(x).float().square().mean().backward()

    return {
        "dtype": str(dtype).removeprefix("torch."), "method": method, "channels_last": channels_last,
        "fwd": time_it(forward, repeats), "fwd_bwd": time_it(train_step, repeats),
    }


def machine(conditions: str) -> dict:
    """Where and under what load the numbers were taken: the shared machine header, plus the
    ``cores`` and ``threads`` keys this report has always shown."""
    return machine_header(conditions, extra={"cores": os.cpu_count(), "threads": torch.get_num_threads()})


def _accelerator_text(mach: dict) -> str:
    """Where the tensors lived (runs recorded before the accelerator was recorded ran on the CPU)."""
    accel = mach.get("accelerator") or {"name": "cpu", "device": "cpu"}
    return f"{accel['name']} accelerator, device {accel['device']}"


def _ms(timing: dict, digits: int = 1) -> str:
    """``median (min)`` in ms, and the median CPU ms when recorded."""
    text = f"{timing['median_s'] * 1e3:.{digits}f}"
    if timing.get("min_s") is not None:
        text += f" ({timing['min_s'] * 1e3:.{digits}f})"
    if timing.get("cpu_median_s") is not None:
        text += f" cpu {timing['cpu_median_s'] * 1e3:.{digits}f}"
    return text


def to_markdown(result: dict) -> str:
    """The report: conditions of each run, then the tables."""
    lines = ["# LRD kernels: plain PyTorch vs the fast exact method", "", "## Conditions", ""]
    for run in result["runs"]:
        size, mach = run["size"], run["machine"]
        lines.append(
            f"- {run['sections']}: feature map {size['channels']} x {size['height']} x {size['width']} "
            f"(batch 1; {run['note']}); LRD input channels {run['lrd_in_channels']}. {mach['cpu']}, "
            f"{mach['cores']} cores, torch {mach['torch']}, {mach['threads']} threads, {mach['date']}; "
            f"{_accelerator_text(mach)}; "
            f"load average (1 min) before {run['load_before']:.1f}, after {run['load_after']:.1f}."
        )
    lines += [""] + [f"{note}" for note in result.get("notes", [])] + [
        "The machine is shared with other jobs (load well above its 2 cores): compare ratios, not",
        "absolute times. Times are medians (min) [cpu = median process CPU time, all threads] of",
        "the timed runs after one warm-up.",
        "",
        "## One depth-wise convolution",
        "",
        "| K | dtype | method | fwd ms | fwd GFLOP/s | fwd+bwd ms | fwd+bwd GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["depthwise"]:
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['method']} | {_ms(r['fwd'])} "
            f"| {r['fwd_gflops']:.1f} | {_ms(r['fwd_bwd'])} | {r['fwd_bwd_gflops']:.1f} |"
        )
    lines += ["", "## Speed-up (direct / fast, medians)", "", "| K | dtype | fwd | fwd+bwd |", "|---|---|---|---|"]
    by_key = {(r["kernel"], r["dtype"], r["method"]): r for r in result["depthwise"]}
    for (kernel, dtype, method), r in by_key.items():
        if method == "fast" and (kernel, dtype, "direct") in by_key:
            d = by_key[(kernel, dtype, "direct")]
            lines.append(
                f"| {kernel} | {dtype} | {d['fwd']['median_s'] / r['fwd']['median_s']:.1f}x "
                f"| {d['fwd_bwd']['median_s'] / r['fwd_bwd']['median_s']:.1f}x |"
            )
    lines += [
        "",
        "## Whole LRD module (k = d = channels, train mode, forward + mean-square loss backward)",
        "",
        "| dtype | depth-wise method | memory format | fwd ms | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for r in result["lrd"]:
        fmt = "channels_last" if r["channels_last"] else "NCHW"
        lines.append(
            f"| {r['dtype']} | {r['method']} | {fmt} | {_ms(r['fwd'], 0)} | {_ms(r['fwd_bwd'], 0)} |"
        )
    lines += [
        "",
        "## What `fast` does (lrss_ds/models/large_kernel.py)",
        "",
        "- forward: `F.conv2d` in the memory format oneDNN runs fast for the kernel (NCHW up to",
        "  13x13, channels-last for larger kernels; the input's own format when it is already",
        "  channels-last), returned in the input's format;",
        "- input gradient: the same fast convolution of the output gradient with the flipped kernel;",
        "- weight gradient: input/gradient cross-correlation at the K x K lags through real FFTs",
        "  (cost independent of K), batch summed in the frequency domain, channel-chunked.",
        "",
        "The plain `direct` path's weight gradient runs at 0.2-7 GFLOP/s for every kernel size",
        "and memory format, which is why even the 7x7 gains in training. All paths are exact;",
        "float32 results match `F.conv2d` to ~1e-6 relative (tests/models/test_models_large_kernel.py).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = benchmark_parser(__doc__.splitlines()[0], out=Path(__file__).resolve().parent / "results")
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--height", type=int, default=213)
    parser.add_argument("--width", type=int, default=225)
    parser.add_argument("--lrd-in-channels", type=int, default=270, help="HRNet-W18 concat: 18+36+72+144")
    parser.add_argument("--kernels", type=int, nargs="+", default=[7, 15, 31])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-depthwise", action="store_true")
    parser.add_argument("--skip-lrd", action="store_true")
    parser.add_argument(
        "--lrd-runs", nargs="+", default=None,
        help="LRD configurations as dtype:variant, variant direct|fast|fast-cl (default: all, every dtype)",
    )
    parser.add_argument("--render", type=Path, default=None, help="only re-write the .md from this .json")
    args = parse_benchmark_args(parser, argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(args.out / "lrd_kernels.md", to_markdown(result))
        return 0
    if args.threads is not None:  # this benchmark times in its own process
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()[0]
    depthwise, lrd = [], []
    for dtype_name in ([] if args.skip_depthwise else args.dtypes):
        for kernel in args.kernels:
            for method in ("direct", "fast"):
                r = bench_depthwise(args.channels, args.height, args.width, kernel, DTYPES[dtype_name], method, args.repeats)
                depthwise.append(r)
                print(
                    f"K={kernel} {dtype_name} {method}: fwd {r['fwd']['median_s'] * 1e3:.1f} ms, "
                    f"fwd+bwd {r['fwd_bwd']['median_s'] * 1e3:.1f} ms",
                    flush=True,
            )
    variants = {"direct": ("direct", False), "fast": ("fast", False), "fast-cl": ("fast", True)}
    lrd_runs = args.lrd_runs or [f"{d}:{v}" for d in args.dtypes for v in variants]
    if not args.skip_lrd:
        for run in lrd_runs:
            dtype_name, variant = run.split(":")
            method, channels_last = variants[variant]
            r = bench_lrd(args.lrd_in_channels, args.channels, args.height, args.width, DTYPES[dtype_name], method, channels_last, args.repeats)
            lrd.append(r)
            print(
                f"LRD {dtype_name} {method} cl={channels_last}: fwd {r['fwd']['median_s'] * 1e3:.0f} ms, "
                f"fwd+bwd {r['fwd_bwd']['median_s'] * 1e3:.0f} ms",
                flush=True,
            )
    area = args.height * args.width / (850 * 900)
    sections = [name for name, skip in (("depthwise", args.skip_depthwise), ("LRD", args.skip_lrd)) if not skip]
    run = {
        "sections": " + ".join(sections),
        "size": {"channels": args.channels, "height": args.height, "width": args.width},
        "note": f"{area:.3g} of the area of the stride-8 map of a 6800x7200 scene, 850 x 900",
        "lrd_in_channels": args.lrd_in_channels,
        "machine": machine(args.conditions), "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    result = {"runs": [run], "depthwise": depthwise, "lrd": lrd}
    write_json_and_markdown(args.out / "lrd_kernels.json", result, to_markdown(result))
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
