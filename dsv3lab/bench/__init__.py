"""Benchmarks that print a table and write results: one module per target (``dsv3lab bench
TARGET``, the command in ``cli``).

Each target module has ``add_args(parser)`` and ``run(args)``. Ratios are against a peer measured
in the same run on this machine; absolute times only mean something on a GPU. Results go to
``results/bench-<target>.json`` (atomic write) unless --out.
"""

from __future__ import annotations

from dsv3lab.atomic import write_json_atomic  # noqa: F401 -- re-exported for the bench targets


def print_table(rows: list[dict], cols: list[str] | None = None) -> str:
    """Print ``rows`` through the lab's one text-table formatter (``dsv3lab.viz.tables.text_table``)
    and return the text (the targets store it beside their rows)."""
    from dsv3lab.viz.tables import text_table
    if not rows:
        return ""
    text = text_table(rows, cols)
    print(text)
    return text
