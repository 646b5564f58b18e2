"""The measurement protocol for comparing engines on one noisy machine: rounds, engines
alternating, machine limits interleaved, median with spread, impossible figures flagged.

A shared 2-core machine changes speed for seconds at a time, so one timing of each engine says
little and a ratio of two timings taken a minute apart says less. Every figure is therefore
measured in ``rounds`` rounds; round r runs the engines in order (A, B, ...) when r is even and
reversed when odd, so neither engine always runs first, right after the limits or on a warm
cache. The machine's limits (a plain matmul's FLOP/s, a plain copy's bytes/s) are measured
before each round and after the last, and a figure is compared with their median. A figure
above 100% of a limit measured in the same run is impossible: the machine got faster or slower
between the limit's measurement and the figure's, and the row says ``valid: false``.

``bench peers`` (dsv3lab against llama.cpp) runs on this; ``bench engine`` follows the same
protocol in its own loop.
"""

from __future__ import annotations

import statistics
from typing import Callable


def alternating_rounds(engines: list[str], rounds: int, measure: Callable[[str, int], list[dict]],
                       limits: Callable[[], dict], progress=None) -> tuple[dict, list[dict]]:
    """Run ``measure(engine, round)`` for every engine in every round, alternating the order,
    with ``limits()`` before each round and after the last. ``measure`` returns rows with at
    least ``what``, ``value`` and ``unit`` (and optionally ``work`` per token and ``limit``, the
    key of the limit it is compared with). Returns ({engine: {what: [row per round]}}, [limits])."""
    per_engine: dict[str, dict[str, list[dict]]] = {e: {} for e in engines}
    lims = []
    for r in range(max(1, rounds)):
        lims.append(limits())
        for e in (engines if r % 2 == 0 else engines[::-1]):
            for row in measure(e, r):
                per_engine[e].setdefault(row["what"], []).append(row)
            if progress is not None:
                progress.update(1)
    lims.append(limits())
    return per_engine, lims


def median_limits(lims: list[dict]) -> dict:
    """The median of each limit over its measurements, with the measurements kept beside it."""
    return dict({k: statistics.median(v[k] for v in lims) for k in lims[0]}, rounds=lims)


def summarize(per_engine: dict, limit: dict, **labels) -> list[dict]:
    """One row per (engine, figure): median over rounds, ``lo``/``hi`` (min/max), the number of
    rounds, ``pct_of_limit`` (value x work per token / the median limit; NaN where no limit
    applies) and ``valid`` (False when that percentage exceeds 100)."""
    rows = []
    for engine, figures in per_engine.items():
        for what, got in figures.items():
            vals = [g["value"] for g in got]
            row = dict(labels, engine=engine, what=what, value=statistics.median(vals), lo=min(vals),
                       hi=max(vals), unit=got[0]["unit"], rounds=len(vals), pct_of_limit=float("nan"))
            if "work" in got[0]:
                row["work"] = got[0]["work"]
                row["limit"] = got[0]["limit"]
                row["pct_of_limit"] = 100 * row["value"] * got[0]["work"] / limit[got[0]["limit"]]
            row["valid"] = not row["pct_of_limit"] > 100
            rows.append(row)
    return rows
