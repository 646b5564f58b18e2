"""Figures for the instruments. Pure functions: data in, a matplotlib ``Figure`` out (never
``plt.show``; nothing global is touched, so tests run them headless on the Agg backend)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure

from dsv3lab.probes.metrics import max_vio


def _t(x):
    return x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def expert_load_heatmap(load, layers: Optional[Sequence[int]] = None, title: Optional[str] = None,
                        relative: bool = True, n_group: Optional[int] = None) -> Figure:
    """Layer x expert heatmap of an [L,E] load. ``relative`` divides each row by its mean, so 1 is
    a perfectly balanced expert; the title quotes the worst layer's MaxVio."""
    load = _t(load).double()
    if load.dim() == 1:
        load = load[None]
    L, E = load.shape
    layers = list(layers) if layers is not None else list(range(L))
    data = load / load.mean(-1, keepdim=True).clamp_min(1e-12) if relative else load
    fig = Figure(figsize=(min(3 + 0.18 * E, 14), 1.2 + 0.35 * L), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L), [str(l) for l in layers])
    if n_group and n_group > 1:
        for g in range(1, n_group):
            ax.axvline(g * E / n_group - 0.5, color="white", lw=0.8, alpha=0.7)
    fig.colorbar(im, ax=ax, label="load / mean load" if relative else "tokens")
    mv = max_vio(load).max()
    ax.set_title(title or f"Expert load (max MaxVio {float(mv):.2f})")
    return fig


def routing_by_token(topk_ids, topk_weights, tokens: Sequence[str], n_experts: int,
                     layer: Optional[int] = None, title: Optional[str] = None,
                     n_group: Optional[int] = None) -> Figure:
    """Token x expert grid for one layer: cell = routing weight of that expert for that token
    (empty where the expert was not chosen). ids/weights [N,k]."""
    ids, w = _t(topk_ids).long(), _t(topk_weights).float()
    N = ids.shape[0]
    grid = torch.full((N, n_experts), float("nan"))
    grid.scatter_(1, ids, w)
    fig = Figure(figsize=(min(3 + 0.2 * n_experts, 14), 1.0 + 0.28 * N), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma_r", interpolation="nearest")
    ax.set_yticks(range(N), [repr(t)[1:-1] if isinstance(t, str) else str(t) for t in tokens])
    ax.set_xlabel("routed expert")
    if n_group and n_group > 1:
        for g in range(1, n_group):
            ax.axvline(g * n_experts / n_group - 0.5, color="grey", lw=0.6)
    fig.colorbar(im, ax=ax, label="routing weight")
    ax.set_title(title or f"Routing, layer {layer}" if layer is not None else (title or "Routing"))
    return fig


def co_selection_heatmap(matrix, title: Optional[str] = None, n_group: Optional[int] = None,
                         normalize: bool = True) -> Figure:
    """[E,E] co-selection counts; ``normalize`` shows P(j chosen | i chosen) (row / diagonal)."""
    C = _t(matrix).double()
    data = C / C.diagonal()[:, None].clamp_min(1) if normalize else C
    E = C.shape[0]
    fig = Figure(figsize=(6.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data.numpy(), cmap="viridis", interpolation="nearest")
    if n_group and n_group > 1:
        for g in range(1, n_group):
            p = g * E / n_group - 0.5
            ax.axvline(p, color="white", lw=0.6)
            ax.axhline(p, color="white", lw=0.6)
    ax.set_xlabel("expert j")
    ax.set_ylabel("expert i")
    fig.colorbar(im, ax=ax, label="P(j | i)" if normalize else "tokens choosing both")
    ax.set_title(title or "Expert co-selection")
    return fig


def kv_bytes_bars(rows: Sequence[dict], label: str = "model", value: str = "bytes_per_token",
                  title: Optional[str] = None, annotate: Optional[str] = None, unit: str = "bytes") -> Figure:
    """Horizontal bars of bytes per token; ``annotate`` names a row key printed at each bar end.
    ``unit="GiB"`` draws the axis in GiB (2**30 bytes) rather than raw bytes, for sizes where
    matplotlib would otherwise print its ticks in units of 1e11."""
    if unit not in ("bytes", "GiB"):
        raise ValueError(f"kv_bytes_bars: unit must be 'bytes' or 'GiB', not {unit!r}")
    scale = 2**30 if unit == "GiB" else 1
    names = [str(r[label]) for r in rows]
    vals = [float(r[value]) / scale for r in rows]
    fig = Figure(figsize=(7, 0.8 + 0.5 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(range(len(rows)), vals, color="tab:blue")
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.set_xlabel(value.replace("_", " ") + (" (GiB)" if unit == "GiB" else ""))
    for b, r, v in zip(bars, rows, vals):
        text = (f"{v:,.2f} GiB" if unit == "GiB" else f"{v:,.0f}") + (f"  ({r[annotate]})" if annotate and r.get(annotate) else "")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, " " + text, va="center", fontsize=8)
    ax.set_xlim(0, max(vals) * 1.35 if vals else 1)
    ax.set_title(title or "KV cache per token")
    return fig


def capacity_curves(series: dict, budgets_gib: Sequence[float], context: int,
                    title: Optional[str] = None) -> Figure:
    """Concurrent requests of ``context`` tokens vs KV budget. ``series``: label -> bytes/token."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    xs = list(budgets_gib)
    for label, per in series.items():
        ax.plot(xs, [int(b * 2**30 // per) // context for b in xs], marker="o", ms=3, label=label)
    ax.set_xlabel("KV-cache budget (GiB)")
    ax.set_ylabel(f"requests of {context:,} tokens")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"KV capacity at {context:,} tokens per request")
    return fig
