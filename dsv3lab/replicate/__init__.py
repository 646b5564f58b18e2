"""The DeepSeek-V3 report's numbers next to what the lab computes, measures and checks.

One function per claim (``@claim(name, section)``), one module per kind of evidence:

  architecture  derived      parameters, KV bytes, training FLOPs, YaRN (the engine on the meta device)
  kernel_shapes derived      FlashMLA's FP8 KV layout, DeepGEMM's GEMM shapes (from the config)
  inference     both         the TPOT bound (paper inputs / config inputs), deployment units, EPLB
  consistency   consistency  costs, LR schedule, routing reach, Day-6: the papers' numbers vs each other
  measured      measured     FP8 accumulation (fp8sim), FP8 training, balancing, MTP, pipeline schedules
  v4_card       derived      DeepSeek-V4's cards: parameters, V4-Pro's FLOPs and KV cache against V3.2 at 1M

Row fields, kinds, tolerances and the status rule are in ``core``; the table as text, HTML and
Markdown in ``table``. ``replicate()`` returns the rows; ``dsv3lab replicate [--json | --markdown]
[--quick] [--only NAME]`` (``cli``) prints them (``--json``: ``{"rows": [...]}``) and writes
``results/replicate.json``. Measured rows read ``data/results/`` (``dsv3lab experiment
NAME`` records them) and are "unavailable: not recorded" without; ``quick=True`` runs each
experiment at its smallest scale instead (CI).
"""

from __future__ import annotations

from typing import Iterable, Optional

from dsv3lab.replicate.core import (CLAIMS, FIELDS, KINDS, STATUSES, Unavailable, absolute, claim, exact,  # noqa: F401
                                    lower, printed, row, status, upper, within)
from dsv3lab.replicate import architecture, kernel_shapes, inference, consistency, measured, v4_card  # noqa: F401,E402  (registers)
from dsv3lab.replicate.inference import tpot_bound  # noqa: F401
from dsv3lab.replicate.table import by_section, counts, fmt, format_table, html_table, markdown_table  # noqa: F401
from dsv3lab.replicate.figures import (fig_kv_bytes, fig_lab_vs_paper, fig_tpot_vs_bandwidth,  # noqa: F401
                                      recorded_figures)


def replicate(only: Optional[Iterable[str] | str] = None, quick: bool = False) -> list[dict]:
    """Rows of every registered claim (or of the names in ``only``), in registry order."""
    if isinstance(only, str):
        only = [only]
    names = list(CLAIMS) if only is None else list(only)
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        raise ValueError(f"unknown claim(s) {unknown}; known: {', '.join(CLAIMS)}")
    out = []
    for name in names:
        section, fn = CLAIMS[name]
        for r in fn(quick):
            r["section"] = r["section"] or section
            r["claim_group"] = name
            out.append(r)
    ids = [r["id"] for r in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise AssertionError(f"duplicate row ids: {dup}")
    return out
