"""The table as text (terminal), as HTML (notebooks, no pandas) and grouped by section."""

from __future__ import annotations

import html

from dsv3lab.replicate.core import KINDS, STATUSES

STATUS_COLORS = dict(match="#d8f3dc", close="#fff3b0", differs="#ffd6d6", unreported="#e9ecef",
                     unavailable="#e9ecef")


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e4:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:,.2f}".rstrip("0").rstrip(".")
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) == 2 and all(isinstance(x, float) for x in v):
            return f"{fmt(v[0])}-{fmt(v[1])}"
        return "[" + ", ".join(str(x) if isinstance(x, int) else fmt(x) for x in v) + "]"
    return str(v)


def fmt_lab(r: dict) -> str:
    s = fmt(r["lab"])
    sp = r.get("spread")
    if sp and sp.get("n", 1) > 1 and r["lab"] is not None:
        s += f" ± {sp['std']:.2g}"
    return s


def by_section(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by section, in table order."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["section"], []).append(r)
    return out


def counts(rows: list[dict]) -> dict:
    """{kind: {status: n}} (every kind and status present, zeros included)."""
    return {k: {s: sum(r["kind"] == k and r["status"] == s for r in rows) for s in STATUSES} for k in KINDS}


def format_table(rows: list[dict], width: int = 60) -> str:
    lines = [f"  {'id':<40} {'kind':<11} {'paper':>14} {'lab':>20}  {'unit':<12} status"]
    for section, rs in by_section(rows).items():
        lines.append(f"\n{section}")
        for r in rs:
            lines.append(f"  {r['id']:<40} {r['kind']:<11} {fmt(r['paper']):>14} {fmt_lab(r):>20}  "
                         f"{r['unit'][:12]:<12} {r['status']}")
    c = counts(rows)
    lines.append("")
    for k in KINDS:
        lines.append(f"{k:<11} " + ", ".join(f"{n} {s}" for s, n in c[k].items() if n))
    return "\n".join(lines)


def html_table(rows: list[dict], notes: bool = True) -> str:
    """An HTML table by section: id, kind, claim, paper, lab (± seed std), unit, status (coloured),
    and the tolerance's reason and the note under the claim."""
    e = html.escape
    out = ['<table style="border-collapse:collapse;font-size:12px">',
           "<tr>" + "".join(f'<th style="text-align:left;padding:2px 6px;border-bottom:1px solid #999">{h}</th>'
                            for h in ("id", "kind", "claim", "paper", "lab", "unit", "status")) + "</tr>"]
    for section, rs in by_section(rows).items():
        out.append(f'<tr><td colspan="7" style="padding:6px 4px 2px;font-weight:bold">{e(section)}</td></tr>')
        for r in rs:
            extra = ""
            if notes:
                bits = [f"tolerance: {r['tol'].get('why', r['tol']['kind'])}"]
                if r["note"]:
                    bits.append(r["note"])
                extra = "".join(f'<div style="color:#666;font-size:11px">{e(b)}</div>' for b in bits)
            cells = [f"<code>{e(r['id'])}</code>", e(r["kind"]), e(r["claim"]) + extra, e(fmt(r["paper"])),
                     e(fmt_lab(r)), e(r["unit"])]
            tds = "".join(f'<td style="padding:2px 6px;vertical-align:top;border-bottom:1px solid #eee">{c}</td>'
                          for c in cells)
            tds += (f'<td style="padding:2px 6px;vertical-align:top;border-bottom:1px solid #eee;'
                    f'background:{STATUS_COLORS[r["status"]]}">{e(r["status"])}</td>')
            out.append(f"<tr>{tds}</tr>")
    out.append("</table>")
    return "\n".join(out)


def markdown_table(rows: list[dict]) -> str:
    """The table in Markdown, one table per kind (consistency apart), a section column, then the
    notes of every row that is not a plain match."""
    out = []
    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        c = counts(rs)[kind]
        out.append(f"**{kind}** ({', '.join(f'{n} {s}' for s, n in c.items() if n)})\n")
        out.append("| section | id | claim | paper | lab | unit | status |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rs:
            cells = [r["section"], f"`{r['id']}`", r["claim"], fmt(r["paper"]), fmt_lab(r), r["unit"], r["status"]]
            out.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
        out.append("")
    notes = [r for r in rows if r["status"] != "match" and r["note"]]
    if notes:
        out.append("Notes on the rows that are not a match:\n")
        out += [f"- `{r['id']}` ({r['status']}): {r['note']}" for r in notes]
    return "\n".join(out) + "\n"
