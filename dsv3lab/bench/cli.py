"""``dsv3lab bench TARGET [--out FILE] ...``: one sub-command per benchmark module of ``dsv3lab.bench``."""

from __future__ import annotations

import importlib

# target (what the user types) -> module in dsv3lab.bench
TARGETS = {"engine": "engine", "parallel": "parallel", "kernels": "triton_kernels", "cpu": "cpu",
           "hooks": "hooks", "sparse": "sparse", "peers": "peers", "released": "released"}


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(TARGETS))
    tsub = p.add_subparsers(dest="target", required=True)
    for target, module in TARGETS.items():
        mod = importlib.import_module(f"dsv3lab.bench.{module}")
        tp = tsub.add_parser(target, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else target)
        tp.add_argument("--out", default=None, help=f"results file (default results/bench-{target}.json)")
        mod.add_args(tp)
        tp.set_defaults(func=mod.run)
