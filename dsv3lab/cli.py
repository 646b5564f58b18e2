"""The ``dsv3lab`` command. Each area registers its own sub-commands (``add_commands(sub)``) in
its own module, listed here, so the parser grows without one file owning every command."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "dsv3lab.commands",        # info, generate
    "dsv3lab.parallel.cli",    # plan
    "dsv3lab.probes.cli",      # trace
    "dsv3lab.train",           # train-lab
    "dsv3lab.experiments.cli", # experiment
    "dsv3lab.replicate.cli",   # replicate
    "dsv3lab.bench.cli",       # bench engine|parallel|kernels|...
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3lab", description="DeepSeek-V3 research lab")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:        # that area has not landed; its commands are simply absent
                continue
            raise
        mod.add_commands(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"dsv3lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
