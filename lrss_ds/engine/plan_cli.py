"""``lrss-ds plan``: parse the sizes and budgets, run the planner, print its table and recommendation."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from lrss_ds.engine.interrupt import terminate_as_exit
from lrss_ds.engine.isolated import json_default
from lrss_ds.engine.plan import CARDS_GIB, GIB, default_cache_dir, make_plan
from lrss_ds.engine.probe import PLAN_SETUPS
from lrss_ds import sizes
from lrss_ds.errors import ConfigError

from lrss_ds.units import MIB


# Largest side a plan is made for: ten times a Sentinel-2 tile (10980 px). Beyond it the linear
# fit is extrapolated by orders of magnitude and its numbers overflow the table's columns.
MAX_SIDE = 100_000


def parse_size(text: str, where: str = "--size") -> tuple[int, int]:
    """Parse ``"HxW"`` (or one number for a square) into ``(height, width)``, at most ``MAX_SIDE``.

    Raises:
        ConfigError: when the text is not of that form or a side is not in 1..``MAX_SIDE``.
    """
    height, width = sizes.parse_size(text, where)
    if max(height, width) > MAX_SIDE:
        raise ConfigError(where, f"{text!r}: a side above {MAX_SIDE} px is not one training sample; cut the scene")
    return height, width


def parse_bytes(text: str, where: str = "--device-mem") -> int:
    """Parse ``"24G"``, ``"512M"``, ``"2.5GiB"`` or a plain byte count into bytes.

    Raises:
        ConfigError: when the text is not a positive size.
    """
    units = {"": 1, "k": 1024, "m": MIB, "g": GIB, "t": 1024 * GIB}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in "kmgt":
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(where, f"{text!r} is not a memory size; expected e.g. 24G, 512M or 2.5GiB") from None
    if value <= 0 or not math.isfinite(value):
        raise ConfigError(where, f"{text!r}: must be positive")
    return int(value * units[unit])


def _parse_sides(text: str, where: str) -> list[int]:
    """``"256,384,512"`` -> ``[256, 384, 512]``."""
    try:
        sides = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(where, f"{text!r}: expected comma-separated integers") from None
    if not sides or min(sides) < 32:
        raise ConfigError(where, f"{text!r}: give at least one side >= 32")
    return sides


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["mode=holistic", "width=18"]`` -> ``{"mode": "holistic", "width": 18}`` (YAML values)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError("--option", f"{item!r}: expected KEY=VALUE")
        options[key] = yaml.safe_load(value)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``lrss-ds plan`` arguments to ``parser``."""
    parser.add_argument("--model", required=True, help="model name (see `lrss-ds models`)")
    parser.add_argument("--size", required=True, help="training sample size HxW, e.g. 6800x7200")
    parser.add_argument("--device-mem", default=None,
                        help="device memory of the card, e.g. 24G: the predicted device peak (on a CPU-only "
                             "machine the simulated one) plus the margin for the CUDA context, allocator "
                             "reserve and workspaces must fit it")
    parser.add_argument("--host-mem", default=None, help="host memory budget (peak RSS), e.g. 64G")
    parser.add_argument("--bands", type=int, default=4, help="input bands (default 4, as FBP: NIR, R, G, B)")
    parser.add_argument("--classes", type=int, default=6, help="classes (default 6)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra model option, repeatable (e.g. mode=holistic)")
    parser.add_argument("--modes", default=",".join(PLAN_SETUPS),
                        help=f"comma-separated memory modes (default all: {','.join(PLAN_SETUPS)})")
    parser.add_argument("--fit-sides", default="256,384,512",
                        help="square sides measured for the fit (default 256,384,512)")
    parser.add_argument("--probe-cap", default="6G", help="RSS cap per measuring probe (default 6G)")
    parser.add_argument("--cache", default=None,
                        help=f"measurement cache folder (default {default_cache_dir()})")
    parser.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")



def _gib(value: float | None) -> str:
    """Bytes as GiB text."""
    return "-" if value is None or math.isnan(value) else f"{value / GIB:.2f}"


def run(args: argparse.Namespace) -> int:
    """``lrss-ds plan``: print the prediction per mode and the recommended mode (exit 0 if one fits)."""
    height, width = parse_size(args.size)
    device_mem = parse_bytes(args.device_mem, "--device-mem") if args.device_mem else None
    host_mem = parse_bytes(args.host_mem, "--host-mem") if args.host_mem else None
    cache = Path(args.cache) if args.cache else default_cache_dir()
    with terminate_as_exit("lrss-ds plan"):  # SIGTERM kills the running probe and removes its folder
        plan = make_plan(
            args.model, height, width, device_mem=device_mem, host_mem=host_mem,
            modes=[m for m in args.modes.split(",") if m], fit_sides=_parse_sides(args.fit_sides, "--fit-sides"),
            bands=args.bands, num_classes=args.classes, model_options=_parse_options(args.option),
            probe_cap=parse_bytes(args.probe_cap, "--probe-cap"), cache_dir=cache, refresh=args.refresh,
            progress=lambda line: print(f"lrss-ds plan: {line}", file=sys.stderr, flush=True),
        )
    if args.json:
        print(json.dumps(plan, indent=2, default=json_default))
        return 0 if plan["recommendation"] else 1
    print(f"{args.model} at {height}x{width}; device = {plan['device_meaning']}")
    print(f"{'mode':<16}{'device GiB':>12}{'host GiB':>10}{'step s':>9}{'step CPU-s':>11}{'fits':>6}{'max side':>10}")
    for p in plan["predictions"]:
        max_side = "any" if p["max_side"] < 0 else str(p["max_side"])
        print(f"{p['mode']:<16}{_gib(p['device_bytes']):>12}{_gib(p['host_bytes']):>10}"
              f"{p['step_s']:>9.1f}{p['step_cpu_s']:>11.1f}{'yes' if p['fits'] else 'no':>6}{max_side:>10}")
    print(f"cards (device only; {plan['device_margin']}):")
    print(f"{'mode':<16}{'needs GiB':>10}" + "".join(f"{f'{card} GB':>8}" for card in CARDS_GIB))
    for mode, card in plan["cards"].items():
        print(f"{mode:<16}{_gib(card['needed_bytes']):>10}"
              + "".join(f"{'fits' if card[str(c)] else 'no':>8}" for c in CARDS_GIB))
    failed = [m for m in plan["measurements"] if m["status"] != "ok"]
    for m in failed:
        print(f"note: {m['mode']} at {m['side']}px did not measure ({m['status']}); not fitted")
    if plan["recommendation"] is None:
        print("recommendation: no mode fits these budgets; see 'max side' above")
        return 1
    override = f" with deepspeed.override {json.dumps(plan['ds_override'])}" if plan["ds_override"] else ""
    print(f"recommendation: {plan['recommendation']} (memory preset {plan['memory_preset']!r}, "
          f"DeepSpeed JSON {plan['ds_config_path']}{override})")
    return 0
