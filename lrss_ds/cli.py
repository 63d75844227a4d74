"""Command-line entry point ``lrss-ds``: dispatches each subcommand to the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lrss_ds.errors import LrssError

# Subcommand -> (module, one-line help). Each module defines ``add_arguments(parser)`` and
# ``run(args) -> int``; it is imported only when its command runs, so `lrss-ds info` does not
# pay for importing torch and DeepSpeed.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lrss_ds.data.synth", "write deterministic synthetic GeoTIFF scenes and labels"),
    "ingest": ("lrss_ds.data.ingest", "ingest GeoTIFF image/label pairs into a Zarr tile store"),
    "info": ("lrss_ds.data.info", "print a tile store's scenes, splits, classes and band statistics"),
    "models": ("lrss_ds.models.listing", "list the models with parameter counts and GFLOPs"),
    "train": ("lrss_ds.engine.train_cli", "train a model in this process (no launcher)"),
    "predict": ("lrss_ds.engine.predict", "write georeferenced class maps for scenes"),
    "evaluate": ("lrss_ds.engine.evaluate", "score a model on a split of a tile store"),
    "export": ("lrss_ds.engine.export", "consolidate a checkpoint into one fp32 weights file"),
    "plan": ("lrss_ds.engine.plan_cli", "predict peak memory per memory mode and recommend one"),
    "demo": ("lrss_ds.engine.demo", "the main job: synthesize, ingest, train and evaluate on CPU"),
    "doctor": ("lrss_ds.engine.doctor", "preflight on this node: versions, accelerator, ops, a collective, a short run"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--local_rank="):
        # the deepspeed launcher's first argument (`--module lrss_ds.cli predict ...`); the
        # rank also reaches the process as LOCAL_RANK
        argv = argv[1:]
    top = argparse.ArgumentParser(prog="lrss-ds", description=__doc__)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints usage or the unknown-command error and exits
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"lrss-ds {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    # `train` takes `key=value` overrides before and after its options, as `python -m
    # lrss_ds.train` does; plain parse_args stops collecting the positionals at the first option
    parse = parser.parse_intermixed_args if name == "train" else parser.parse_args
    args = parse(argv[1:])
    try:
        return int(module.run(args) or 0)
    except LrssError as error:
        print(f"lrss-ds {name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lrss-ds {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
