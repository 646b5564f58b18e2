"""``dsv3lab bench TARGET``: benchmark commands that print a table and write results.

Each target is a module ``dsv3lab.bench.<target>`` with ``add_args(parser)`` and ``run(args)``.
Ratios are against a peer measured in the same run on this machine; absolute times only mean
something on a GPU. Results go to ``results/bench-<target>.json`` (atomic write) unless --out.
"""

from __future__ import annotations

import importlib

from dsv3lab.atomic import write_json_atomic  # noqa: F401 -- re-exported for the bench targets

TARGETS = ["engine", "parallel", "kernels", "cpu", "hooks", "sparse", "peers", "released"]


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(TARGETS))
    tsub = p.add_subparsers(dest="target", required=True)
    for t in TARGETS:
        try:
            mod = importlib.import_module(f"dsv3lab.bench.{t}")
        except ModuleNotFoundError as e:
            if e.name == f"dsv3lab.bench.{t}":
                continue
            raise
        tp = tsub.add_parser(t, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else t)
        tp.add_argument("--out", default=None, help=f"results file (default results/bench-{t}.json)")
        mod.add_args(tp)
        tp.set_defaults(func=mod.run)


def print_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """Plain-text table of dict rows; returns the text (also printed)."""
    if not rows:
        return ""
    cols = cols or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    w = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols)),
             "  ".join("-" * w[i] for i in range(len(cols)))]
    lines += ["  ".join(row[i].rjust(w[i]) for i in range(len(cols))) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text
