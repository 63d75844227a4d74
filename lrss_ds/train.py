"""Training entry point for the ``deepspeed`` launcher: one process per rank.

Usage::

    deepspeed --num_gpus 2 --module lrss_ds.train --config ds_configs/ehsnet_synthetic.yaml \\
        [--output DIR] [--resume] [dotted.key=value ...]

On CPU, export ``DS_ACCELERATOR=cpu``; ``--num_gpus N`` then starts N ranks on this host (gloo on
loopback). Without a launcher (``python -m lrss_ds.train ...``) it is a one-rank job, like
``lrss-ds train``.
"""

from __future__ import annotations

import argparse
import sys

from lrss_ds.engine import train_cli
from lrss_ds.errors import LrssError


def main(argv: list[str] | None = None) -> int:
    """Parse arguments (the launcher adds ``--local_rank``; the rank comes from the environment) and train."""
    parser = argparse.ArgumentParser(prog="python -m lrss_ds.train", description=__doc__.splitlines()[0])
    train_cli.add_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    try:
        return train_cli.run(args)
    except LrssError as error:
        print(f"lrss_ds.train: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
