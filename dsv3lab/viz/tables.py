"""Rows of dicts as a table: the lab's one table formatter, for notebooks and terminals (pandas-free).

``html_table(rows)`` returns a ``Table``: Jupyter shows its ``_repr_html_`` (left-aligned text,
right-aligned numbers with thousands separators, a caption), and a plain-text console its
``__repr__``. Nothing is printed as a side effect, so a notebook cell ends with the call, or
passes it to ``display``.

``text_table(rows)`` is the same table as text, what every command prints (``dsv3lab bench``,
``dsv3lab replicate``, ``experiments.table``): a header, a rule, one line per row, numbers right
and text left, cells through ``format_cell`` unless a column has its own format; ``group`` names a
column whose value heads each run of rows instead of filling a column.
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
        num = {c: self._right(c) for c in self.cols}
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

    def _right(self, col) -> bool:
        return all(_numeric(r.get(col)) for r in self.rows if r.get(col) is not None)

    def text(self, align: Optional[dict[str, str]] = None, group: Optional[str] = None) -> str:
        """The table as text: ``align`` maps a column to "left" or "right" (default: numbers
        right, text left); ``group`` a column shown as a heading line (after a blank one) where
        its value changes."""
        cols = [c for c in self.cols if c != group]
        align = dict(align or {})
        bad = {c: a for c, a in align.items() if a not in ("left", "right")}
        if bad:
            raise ValueError(f"text_table: align must be 'left' or 'right', got {bad}")
        right = [align.get(c, "right" if self._right(c) else "left") == "right" for c in cols]
        cells = [[self._cell(c, r.get(c)) for c in cols] for r in self.rows]
        w = [max([len(str(c))] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

        def line(items) -> str:
            return "  ".join(s.rjust(w[i]) if right[i] else s.ljust(w[i]) for i, s in enumerate(items)).rstrip()

        lines = ([self.caption] if self.caption else []) + [line([str(c) for c in cols]),
                                                            "  ".join("-" * n for n in w)]
        heading = object()
        for r, row in zip(self.rows, cells):
            if group is not None and r.get(group) != heading:
                heading = r.get(group)
                lines += ["", str(heading)]
            lines.append(line(row))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()


def html_table(rows: Sequence[dict], cols: Optional[Sequence[str]] = None, caption: str = "",
               formats: Optional[dict[str, Callable]] = None) -> Table:
    """A table of ``rows`` (dicts) for a notebook: ``cols`` picks and orders columns (default:
    every key, first-seen order), ``formats`` maps a column to its own value -> str."""
    return Table(rows, cols, caption, formats)


def text_table(rows: Sequence[dict], cols: Optional[Sequence[str]] = None, caption: str = "",
               formats: Optional[dict[str, Callable]] = None, align: Optional[dict[str, str]] = None,
               group: Optional[str] = None) -> str:
    """``rows`` as plain text (``cols``, ``caption``, ``formats`` as for ``html_table``; ``align``
    and ``group`` as for ``Table.text``). Returns the text; printing it is the caller's choice."""
    return Table(rows, cols, caption, formats).text(align=align, group=group)
