"""The table as text (terminal), as HTML (notebooks, no pandas) and grouped by section."""

from __future__ import annotations

from dsv3lab.replicate.core import KINDS, STATUSES
from dsv3lab.viz.tables import html_table as viz_html_table, text_table

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


def format_table(rows: list[dict]) -> str:
    """The table as text through the lab's one formatter (``dsv3lab.viz.tables.text_table``): one
    line per row under its section's heading, then the count of each status per kind."""
    flat = [dict(section=r["section"], id=r["id"], kind=r["kind"], paper=fmt(r["paper"]), lab=fmt_lab(r),
                 unit=r["unit"], status=r["status"]) for r in rows]
    lines = [text_table(flat, ["section", "id", "kind", "paper", "lab", "unit", "status"], group="section",
                        align=dict(paper="right", lab="right"))]
    c = counts(rows)
    lines.append("")
    for k in KINDS:
        lines.append(f"{k:<11} " + ", ".join(f"{n} {s}" for s, n in c[k].items() if n))
    return "\n".join(lines)


def html_table(rows: list[dict], notes: bool = True) -> str:
    """The table as HTML for a notebook, through the lab's one table helper
    (``dsv3lab.viz.tables.html_table``: text left, numbers right, ``$`` kept out of TeX): section,
    id, kind, claim, paper, lab, seed std (when several seeds ran), unit, status, and with ``notes``
    the tolerance's reason and the row's note."""
    flat = []
    for section, rs in by_section(rows).items():
        for r in rs:
            sp = r.get("spread") or {}
            row = dict(section=section, id=r["id"], kind=r["kind"], claim=r["claim"], paper=r["paper"],
                       lab=r["lab"], seed_std=sp["std"] if sp.get("n", 1) > 1 and r["lab"] is not None else None,
                       unit=r["unit"], status=r["status"])
            if notes:
                row["notes"] = "; ".join([f"tolerance: {r['tol'].get('why', r['tol']['kind'])}"]
                                         + ([r["note"]] if r["note"] else []))
            flat.append(row)
    if not any(r["seed_std"] is not None for r in flat):
        for r in flat:
            del r["seed_std"]
    return viz_html_table(flat, formats=dict(paper=fmt, lab=fmt, seed_std=lambda v: "" if v is None else f"± {v:.2g}"))._repr_html_()


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
