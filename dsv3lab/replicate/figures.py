"""Figures of the table (pure functions returning matplotlib Figures; no pyplot state).

  fig_lab_vs_paper      chosen rows: the paper's figure (or bound / range) beside the lab's value,
                        with the per-seed points of measured rows
  fig_kv_bytes          KV-cache bytes per token, paper vs lab (the kv_bytes_* rows)
  fig_tpot_vs_bandwidth the TPOT bound against all-to-all bandwidth, with the paper's two points
"""

from __future__ import annotations

from typing import Optional, Sequence

from dsv3lab.replicate.table import STATUS_COLORS, fmt


def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout="constrained")


def fig_lab_vs_paper(rows: list[dict], ids: Sequence[str], title: str = "", xlabel: str = "",
                     log: bool = False):
    """One line per row id: the paper's number as a red tick (a bound as an arrow, a range as a
    band), the lab's value as a dot coloured by status, each seed as a small grey dot."""
    by = {r["id"]: r for r in rows}
    missing = [i for i in ids if i not in by]
    if missing:
        raise KeyError(f"no rows with ids {missing}")
    rs = [by[i] for i in ids]
    fig = _figure(7.5, 0.9 + 0.45 * len(rs))
    ax = fig.subplots()
    for y, r in enumerate(rs):
        p, tol = r["paper"], r["tol"]
        if isinstance(p, (list, tuple)) and tol["kind"] == "range":
            ax.fill_betweenx([y - 0.3, y + 0.3], p[0], p[1], color="tab:red", alpha=0.25, lw=0)
        elif tol["kind"] in ("upper", "lower"):
            b = tol.get("value") if tol.get("value") is not None else p
            if isinstance(b, (int, float)):
                ax.plot([b], [y], marker="<" if tol["kind"] == "upper" else ">", color="tab:red", ms=8)
        elif isinstance(p, (int, float)):
            ax.plot([p], [y], marker="|", color="tab:red", ms=16, mew=2)
        sp = r.get("spread") or {}
        for v in sp.get("per_seed", []):
            ax.plot([v], [y + 0.15], "o", color="0.5", ms=3)
        if r["lab"] is not None:
            ax.plot([r["lab"]], [y], "o", ms=8, mec="k", color=STATUS_COLORS[r["status"]])
            ax.annotate(f" {fmt(r['lab'])} ({r['status']})", (r["lab"], y), fontsize=7, va="bottom")
        else:
            ax.text(0.02, y, f"{r['status']}: {r['note'][:48]}", transform=ax.get_yaxis_transform(),
                    fontsize=7, va="center", color="0.4")
    ax.set_yticks(range(len(rs)), [r["id"] for r in rs], fontsize=7)
    ax.set_ylim(len(rs) - 0.5, -0.5)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or "value (red: paper -- tick a figure, arrow a bound, band a range)", fontsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return fig


def fig_kv_bytes(rows: list[dict]):
    """Paper vs lab bars of the KV bytes per token rows."""
    kv = [r for r in rows if r["id"].startswith("kv_bytes_per_token_")]
    fig = _figure(7, 2.8)
    ax = fig.subplots()
    y = range(len(kv))
    ax.barh([i - 0.2 for i in y], [r["paper"] for r in kv], height=0.4, label="paper (ISCA '25 Table 1)",
            color="tab:red", alpha=0.6)
    ax.barh([i + 0.2 for i in y], [r["lab"] or 0 for r in kv], height=0.4, label="lab", color="tab:blue")
    base = kv[0]["lab"] or 1
    for i, r in enumerate(kv):
        if r["lab"] is not None:
            ax.text(r["lab"], i + 0.2, f" {r['lab']:,} B ({r['lab'] / base:.2f}x)", va="center", fontsize=8)
    ax.set_yticks(list(y), [r["id"].removeprefix("kv_bytes_per_token_") for r in kv])
    ax.invert_yaxis()
    ax.set_xlim(0, max((r["lab"] or 0) for r in kv) * 1.45)
    ax.set_xlabel("KV cache bytes per token (BF16, all layers)")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def fig_tpot_vs_bandwidth(lo: float = 10, hi: float = 2000, hidden: Optional[int] = None):
    """tokens/s bound of EP decoding against bandwidth, with the ISCA paper's two points."""
    import numpy as np
    from dsv3lab.replicate.inference import ISCA_TPOT, tpot_bound
    inputs = dict(ISCA_TPOT, **({"hidden": hidden} if hidden else {}))
    bw = np.geomspace(lo, hi, 200)
    fig = _figure(7, 3.3)
    ax = fig.subplots()
    ax.loglog(bw, [tpot_bound(b, **inputs)["tok_per_s"] for b in bw],
              label=f"1 / (3 B x 32 x 9 x {inputs['hidden']} / BW x 2 x 61)")
    for b, tps, label, dx, ha in ((50, 67, "H800 IB 50 GB/s: paper ~67 tok/s", 6, "left"),
                                  (900, 1200, "GB200 NVL72 900 GB/s: paper ~1200 tok/s", -8, "right")):
        ax.plot([b], [tps], "o", color="tab:red")
        ax.annotate(label, (b, tps), textcoords="offset points", xytext=(dx, -12), fontsize=8, ha=ha)
    ax.set_xlabel("all-to-all bandwidth per GPU (GB/s)")
    ax.set_ylabel("upper bound on tokens/s per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def recorded_figures(name: str) -> dict:
    """{title: Figure} of experiment ``name``'s recorded result; {} when it was never recorded."""
    from dsv3lab import experiments
    res = experiments.load_result(name)
    return {} if res is None else experiments.figures(name, res)
