"""dsv3lab.viz.tables: rows of dicts rendered as an HTML table (and as text)."""

import html.parser

import pytest

from dsv3lab.viz.tables import format_cell, html_table, text_table


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.aligns, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
            self.aligns.append([])
        if tag in ("td", "th"):
            self._in = tag
            self.rows[-1].append("")
            style = dict(attrs).get("style", "")
            self.aligns[-1].append("right" if "text-align:right" in style else "left")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.rows[-1][-1] += data


def _parse(t):
    p = _Cells()
    p.feed(t._repr_html_())
    return p


def test_cells_columns_and_alignment():
    rows = [dict(layout="absorbed", bytes_per_token=70272, ratio=1.0),
            dict(layout="gqa-8 <x>", bytes_per_token=249856, ratio=3.5556, extra=True)]
    p = _parse(html_table(rows, caption="KV"))
    assert p.rows[0] == ["layout", "bytes_per_token", "ratio", "extra"]      # every key, first-seen order
    assert p.rows[1] == ["absorbed", "70,272", "1", ""]
    assert p.rows[2] == ["gqa-8 <x>", "249,856", "3.556", "True"]             # escaped, then unescaped by the parser
    assert p.aligns[1] == ["left", "right", "right", "left"]
    assert "<x>" not in html_table(rows)._repr_html_()


def test_dollars_are_not_tex_delimiters():
    h = html_table([dict(claim="$5.576M at $2 per GPU-hour")])._repr_html_()
    assert "<span>$</span>5.576M at <span>$</span>2" in h
    assert _parse(html_table([dict(claim="$5 at $2")])).rows[1] == ["$5 at $2"]


def test_cols_select_and_missing_column_is_named():
    t = html_table([dict(a=1, b=2)], cols=["b"])
    assert _parse(t).rows == [["b"], ["2"]]
    with pytest.raises(KeyError, match=r"row 0 has no column\(s\) \['c'\]"):
        html_table([dict(a=1)], cols=["a", "c"])


def test_format_cell():
    assert format_cell(1234567) == "1,234,567"
    assert format_cell(2.5e-5) == "2.50e-05"
    assert format_cell(123456.7) == "123,457"
    assert format_cell([1, 2.0]) == "[1, 2]"
    assert format_cell(None) == ""


def test_text_repr():
    text = repr(html_table([dict(name="x", n=10)], formats={"n": lambda v: f"{v} B"}))
    assert text.splitlines() == ["name     n", "----  ----", "x     10 B"]     # numbers right, as in HTML


def test_text_table_alignment_groups_and_formats():
    rows = [dict(sec="A", name="kv", bytes=70272, ratio=1.0), dict(sec="A", name="gqa", bytes=249856, ratio=3.5556),
            dict(sec="B", name="mha", bytes=None, ratio=12.5)]
    text = text_table(rows, group="sec", formats=dict(ratio=lambda v: f"{v:.1f}x"), align=dict(ratio="right"))
    assert text.splitlines() == ["name    bytes  ratio",
                                 "----  -------  -----",
                                 "",
                                 "A",
                                 "kv     70,272   1.0x",
                                 "gqa   249,856   3.6x",
                                 "",
                                 "B",
                                 "mha            12.5x"]      # None: an empty cell
    assert text_table([dict(a="x")], caption="T").splitlines() == ["T", "a", "-", "x"]
    with pytest.raises(ValueError, match="align must be 'left' or 'right'"):
        text_table([dict(a=1)], align=dict(a="centre"))
