"""Rows of dicts as a table a notebook renders (pandas-free).

``html_table(rows)`` returns a ``Table``: Jupyter shows its ``_repr_html_`` (left-aligned text,
right-aligned numbers with thousands separators, a caption), and a plain-text console its
``__repr__``. Nothing is printed as a side effect, so a notebook cell ends with the call, or
passes it to ``display``.
"""

from __future__ import annotations

import html
import math
from typing import Callable, Optional, Sequence


def format_cell(v) -> str:
    """How one value reads in a table: ints with separators, floats to 4 significant digits
    (scientific below 1e-3), lists compact, bools as True/False."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:,.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_cell(x) for x in v) + "]"
    return str(v)


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Table:
    def __init__(self, rows: Sequence[dict], cols: Optional[Sequence[str]] = None, caption: str = "",
                 formats: Optional[dict[str, Callable]] = None):
        self.rows = [dict(r) for r in rows]
        cols = list(cols) if cols is not None else []
        if cols:
            for i, r in enumerate(self.rows):
                missing = [c for c in cols if c not in r]
                if missing:
                    raise KeyError(f"html_table: row {i} has no column(s) {missing}; it has {sorted(r)}")
        else:
            for r in self.rows:                  # every column, in first-seen order
                cols += [c for c in r if c not in cols]
        self.cols, self.caption, self.formats = cols, caption, dict(formats or {})

    def _cell(self, col, v) -> str:
        f = self.formats.get(col)
        return f(v) if f is not None else format_cell(v)

    def _repr_html_(self) -> str:
        def e(text: str) -> str:
            # JupyterLab typesets $...$ in HTML outputs as TeX ("$5.6M at $2" turns into math); a
            # dollar alone in its element is not a delimiter (its tex2jax_ignore class is not honoured)
            return html.escape(text).replace("$", "<span>$</span>")
        th = "padding:3px 10px;border-bottom:1px solid #888;text-align:{}"
        td = "padding:2px 10px;border-bottom:1px solid #eee;text-align:{};font-variant-numeric:tabular-nums"
        num = {c: all(_numeric(r.get(c)) for r in self.rows if r.get(c) is not None) for c in self.cols}
        out = ['<table style="border-collapse:collapse;font-size:12.5px;margin:4px 0">']
        if self.caption:
            out.append(f'<caption style="caption-side:top;text-align:left;font-weight:bold;padding:2px 0;white-space:nowrap">'
                       f"{e(self.caption)}</caption>")
        out.append("<tr>" + "".join(f'<th style="{th.format("right" if num[c] else "left")}">{e(str(c))}</th>'
                                    for c in self.cols) + "</tr>")
        for r in self.rows:
            out.append("<tr>" + "".join(
                f'<td style="{td.format("right" if num[c] else "left")}">{e(self._cell(c, r.get(c)))}</td>'
                for c in self.cols) + "</tr>")
        out.append("</table>")
        return "\n".join(out)

    def __repr__(self) -> str:
        cells = [[self._cell(c, r.get(c)) for c in self.cols] for r in self.rows]
        w = [max([len(str(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(self.cols)]
        lines = ([self.caption] if self.caption else []) + [
            "  ".join(str(c).ljust(w[i]) for i, c in enumerate(self.cols)),
            "  ".join("-" * n for n in w)]
        lines += ["  ".join(row[i].ljust(w[i]) for i in range(len(self.cols))) for row in cells]
        return "\n".join(lines)


def html_table(rows: Sequence[dict], cols: Optional[Sequence[str]] = None, caption: str = "",
               formats: Optional[dict[str, Callable]] = None) -> Table:
    """A table of ``rows`` (dicts) for a notebook: ``cols`` picks and orders columns (default:
    every key, first-seen order), ``formats`` maps a column to its own value -> str."""
    return Table(rows, cols, caption, formats)
