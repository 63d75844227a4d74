"""``lrss-ds train``: the training entry point's arguments and body, shared with ``lrss_ds.train``.

``lrss-ds train --config X.yaml`` runs in this one process (a one-rank job);
``deepspeed --num_gpus N --module lrss_ds.train --config X.yaml`` runs the same code in every rank
the launcher starts.
"""

from __future__ import annotations

import argparse

from lrss_ds.engine.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--output``, ``--resume`` and the ``dotted.key=value`` overrides."""
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. ds_configs/ehsnet_synthetic.yaml)")
    parser.add_argument("--output", help="run directory (default: the config's train.output)")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue from OUTPUT/checkpoints/latest (model, optimizer, schedule, data position, RNG)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="config overrides, before or after the options, value read as YAML: train.iterations=20 model.options.lrd_k=32",
    )


def run(args: argparse.Namespace) -> int:
    """Load the config, apply overrides and ``--output``, train.

    Returns:
        0 when training finished, 143 after a SIGTERM-triggered checkpoint.

    Raises:
        ConfigError, StoreError, OutputExistsError, TrainingError: reported by the CLI as one line.
    """
    from lrss_ds.engine.trainer import run_training

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"train.output={args.output}")
    config = load_config(args.config, overrides)
    return run_training(config, resume=args.resume)
