"""The ``dsv3lab`` command: one parser that collects each area's sub-commands.

Each area registers its own sub-commands (``add_commands(sub)``) in its own ``cli`` module, listed
in ``COMMAND_MODULES``, so the parser grows without one file owning every command:

  dsv3lab info | generate            dsv3lab/cli/engine.py       the engine: a model's numbers, generation
  dsv3lab plan                       dsv3lab/parallel/cli.py     a parallel layout's memory and traffic
  dsv3lab trace                      dsv3lab/probes/cli.py       routing traces
  dsv3lab train-lab                  dsv3lab/train/cli.py        the lab model's training run
  dsv3lab experiment NAME | list     dsv3lab/experiments/cli.py  the report's ablations at lab scale
  dsv3lab replicate                  dsv3lab/replicate/cli.py    the report's numbers next to the lab's
  dsv3lab bench TARGET               dsv3lab/bench/cli.py        benchmarks (targets: dsv3lab/bench/*.py)

Arguments and output shared by several commands (dtype names, token-id lists, prompts, printing
generations) are in ``dsv3lab/cli/args.py``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "dsv3lab.cli.engine",         # info, generate
    "dsv3lab.parallel.cli",       # plan
    "dsv3lab.probes.cli",         # trace
    "dsv3lab.train.cli",          # train-lab
    "dsv3lab.experiments.cli",    # experiment
    "dsv3lab.replicate.cli",      # replicate
    "dsv3lab.bench.cli",          # bench engine|parallel|kernels|...
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3lab", description="DeepSeek-V3 research lab")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:      # every area is part of the package: a failing import is an error
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv3lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)
