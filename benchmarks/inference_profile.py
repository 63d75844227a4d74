"""Where holistic prediction's time goes: CPU seconds per stage against that stage's FLOPs and the 3x3 floor.

Runs one ``write_prediction`` (what ``lrss-ds predict`` runs per scene, on the same banded path
as a whole scene) of a synthetic 4-band scene in this process, with a CPU-time timer around
every stage of the forward (the front's stem, ``layer1`` and ``transition1`` band by band, HRNet
stages 2-4, the LRD's branches, the heads, the streamed ECR, the upsampling/argmax and the
writer), and optionally ``torch.profiler``'s operator table. Each stage's FLOPs are counted on
the meta device with ``FlopCounterMode`` per module of the unbanded forward (the work the model
needs; bands that recompute halos spend more), and its CPU floor is those FLOPs divided by the
CPU throughput of a plain 64 -> 64 3x3 convolution of the same precision and layout measured
in the same process just before (``benchmarks/inference.py``'s floor).

    python benchmarks/inference_profile.py [--size 2048x2048] [--model paper|demo|fcn] [--bf16]
        [--ops] [--json out.json]

Timers are inclusive of nothing: each stage's seconds exclude the stages timed inside it
("other" is the forward's untimed remainder: band bookkeeping, copies between bands).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from _harness import REPO_ROOT, parse_size  # noqa: E402
from inference import BANDS, conv_throughput, write_scene  # noqa: E402

MODELS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "paper": ("ehsnet", 24, {"backbone": "hrnet_w18", "lrd_k": 256, "lrd_d": 256}),
    "fcn": ("hrnet_fcn", 24, {"backbone": "hrnet_w18"}),
}


def model_spec(key: str) -> tuple[str, int, dict[str, Any]]:
    """``(name, classes, options)`` of ``paper``, ``fcn`` or ``demo`` (ds_configs/ehsnet_synthetic.yaml)."""
    if key == "demo":
        demo = yaml.safe_load((REPO_ROOT / "ds_configs" / "ehsnet_synthetic.yaml").read_text())["model"]
        return demo["name"], 6, dict(demo.get("options") or {})
    return MODELS[key]


class StageClock:
    """Exclusive CPU seconds per stage name, with nesting: a stage's time excludes the stages inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []  # [name, start, children seconds]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (and mark it for torch.profiler)."""
        self._stack.append([name, time.process_time(), 0.0])
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            _, start, children = self._stack.pop()
            elapsed = time.process_time() - start
            self.seconds[name] += elapsed - children
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][2] += elapsed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed as stage ``name``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


def stage_modules(net: torch.nn.Module) -> dict[str, list[str]]:
    """Stage name -> qualified module names whose FLOPs (and forwards) belong to it."""
    stages: dict[str, list[str]] = {}
    backbone = "backbone"
    stages["stem"] = [f"{backbone}.conv1", f"{backbone}.conv2", f"{backbone}.bn1", f"{backbone}.bn2"]
    stages["layer1"] = [f"{backbone}.layer1"]
    stages["transition1"] = [f"{backbone}.transition1"]
    stages["stages2-4"] = [f"{backbone}.{n}" for n in ("stage2", "stage3", "stage4", "transition2", "transition3")]
    lrd = getattr(net, "lrd", None)
    if lrd is not None and hasattr(lrd, "unit"):
        stages["lrd.reduce"] = ["lrd.reduce"]
        stages["lrd.dense5x5"] = ["lrd.unit.dense"]
        for i, _ in enumerate(lrd.unit.depthwise):
            stages[f"lrd.dw{lrd.unit.depthwise[i][0].kernel_size}"] = [f"lrd.unit.depthwise.{i}"]
        stages["lrd.fuse1x1"] = ["lrd.unit.fuse"]
        stages["lrd.increase"] = ["lrd.increase"]
    elif lrd is not None:
        stages["lrd"] = ["lrd"]
    for name in ("head", "aux_head"):
        if getattr(net, name, None) is not None:
            stages[name] = [name]
    if getattr(net, "ecr", None) is not None:
        stages["ecr"] = ["ecr"]
    return stages


def flops_per_stage(name: str, classes: int, options: dict[str, Any], size: tuple[int, int]) -> dict[str, float]:
    """FLOPs of each stage's modules in the unbanded eval forward at ``size`` (meta device)."""
    from lrss_ds.models import build_model

    with torch.device("meta"):
        net = build_model(name, classes, BANDS, **options).eval()
    x = torch.zeros(1, BANDS, *size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    counts = counter.get_flop_counts()
    root = type(net).__name__
    total = float(sum(counts["Global"].values()))
    out: dict[str, float] = {}
    for stage, modules in stage_modules(net).items():
        # a module's count includes its children's, and a container whose own forward is not
        # called (a Sequential run block by block) has none: sum the outermost counted ones
        keys = [k for k in counts for m in modules if k == f"{root}.{m}" or k.startswith(f"{root}.{m}.")]
        outermost = [k for k in keys if not any(k.startswith(other + ".") for other in keys)]
        out[stage] = float(sum(sum(counts[k].values()) for k in outermost))
    out["total"] = total
    return out


def instrument(net: torch.nn.Module, clock: StageClock) -> None:
    """Put a timer on every stage's modules (instance attributes; the banded forwards call them)."""
    from lrss_ds.engine import inference
    from lrss_ds.memory import banded_inference

    modules = dict(net.named_modules())
    for stage, names in stage_modules(net).items():
        for qualified in names:
            if qualified in modules:
                for module in modules[qualified].modules():  # every descendant: the banded forwards call blocks
                    module.forward = clock.wrap(stage, module.forward)
    backbone = getattr(net, "backbone", None)
    if backbone is not None:
        backbone._stem = clock.wrap("stem", backbone._stem)
        backbone._layer1 = clock.wrap("layer1", backbone._layer1)
    banded_inference._branch_rows = clock.wrap("branch upsample+concat", banded_inference._branch_rows)
    banded_inference.StreamedECR.add = clock.wrap("ecr", banded_inference.StreamedECR.add)
    banded_inference.StreamedECR.finish = clock.wrap("ecr", banded_inference.StreamedECR.finish)
    banded_inference.RowLogits.rows = clock.wrap("pixel upsample", banded_inference.RowLogits.rows)
    inference.Predictor._finish = clock.wrap("argmax+mask", inference.Predictor._finish)
    banded_eval = inference.banded_eval

    @contextlib.contextmanager
    def timed_banded_eval(*args: Any, **kwargs: Any) -> Iterator[None]:
        with clock.stage("other (forward glue)"), banded_eval(*args, **kwargs):
            yield

    inference.banded_eval = timed_banded_eval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2048x2048")
    parser.add_argument("--model", default="paper", choices=["paper", "demo", "fcn"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--ops", action="store_true", help="also run torch.profiler and print its operator table")
    parser.add_argument("--json", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from lrss_ds.data.rasters import open_geotiff
    from lrss_ds.engine.inference import predictor_for
    from lrss_ds.engine.prediction_writer import write_prediction
    from lrss_ds.models import build_model

    size = parse_size(args.size)
    name, classes, options = model_spec(args.model)
    flops = flops_per_stage(name, classes, options, size)
    _, conv_per_cpu_s = conv_throughput(args.bf16, 384)
    torch.manual_seed(0)
    net = build_model(name, classes, BANDS, band_mean=[100.0] * BANDS, band_std=[50.0] * BANDS, **options).eval()
    meta = {"model": net.config(), "dataset": {"classes": [f"class{k}" for k in range(classes)]}}
    predictor = predictor_for(net, meta, bf16=args.bf16)
    clock = StageClock()
    instrument(net, clock)
    with tempfile.TemporaryDirectory(prefix="lrss_profile_") as tmp:
        scene = Path(tmp) / "scene.tif"
        write_scene(scene, *size)
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if args.ops else None
        start = time.process_time()
        with profiler if profiler is not None else contextlib.nullcontext():
            write_prediction(open_geotiff(scene), predictor, meta, Path(tmp) / "map.tif", overviews=False)
        total = time.process_time() - start
    timed = sum(clock.seconds.values())
    clock.seconds["writer (outside the forward)"] += total - timed
    rows = []
    print(f"{name} {options} {classes} classes, {size[0]}x{size[1]}, {'bf16' if args.bf16 else 'fp32'}; "
          f"3x3 conv {conv_per_cpu_s / 1e9:.2f} GFLOP per CPU-s; total {total:.1f} CPU-s for "
          f"{flops['total'] / 1e9:.1f} GFLOPs = {total / (flops['total'] / conv_per_cpu_s):.2f}x the CPU floor")
    print(f"{'stage':32s} {'CPU s':>8s} {'share':>6s} {'GFLOPs':>8s} {'GFLOP/CPU-s':>11s} {'s/floor':>8s} calls")
    for stage, seconds in sorted(clock.seconds.items(), key=lambda kv: -kv[1]):
        stage_flops = flops.get(stage, 0.0)
        rate = stage_flops / seconds / 1e9 if seconds > 0 and stage_flops else None
        ratio = seconds / (stage_flops / conv_per_cpu_s) if stage_flops else None
        rows.append(dict(stage=stage, cpu_seconds=seconds, share=seconds / total, gflops=stage_flops / 1e9,
                         gflop_per_cpu_s=rate, floor_ratio=ratio, calls=clock.calls.get(stage, 0)))
        print(f"{stage:32s} {seconds:8.2f} {seconds / total:6.1%} {stage_flops / 1e9:8.1f} "
              f"{'' if rate is None else f'{rate:11.2f}':>11s} {'' if ratio is None else f'{ratio:8.2f}':>8s} "
              f"{clock.calls.get(stage, 0)}")
    if profiler is not None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    if args.json is not None:
        args.json.write_text(json.dumps(dict(model=name, options=options, size=list(size), bf16=args.bf16,
                                             cpu_seconds=total, gflops=flops["total"] / 1e9,
                                             conv_gflop_per_cpu_s=conv_per_cpu_s / 1e9, stages=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
