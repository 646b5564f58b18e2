"""Figures for DeepSeek Sparse Attention (notebook 06): pure functions, data in, a Figure out."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure


def selection_over_attention(probs: torch.Tensor, topk: torch.Tensor, title: str = "",
                             pieces: Optional[Sequence[str]] = None) -> Figure:
    """Dense attention summed over heads [S,T] (grey scale) with the indexer's selected keys of
    each query [S,k] marked (dots): does the indexer keep where MLA looks?"""
    p = probs.detach().float().cpu()
    S, T = p.shape
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(p.clamp_min(1e-4).log10().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
    idx = topk.detach().cpu().long()
    q = torch.arange(S)[:, None].expand_as(idx)
    ok = idx >= 0
    ax.scatter(idx[ok].numpy(), q[ok].numpy(), s=3, c="tab:red", marker="s", linewidths=0)
    ax.set_xlabel("key position t")
    ax.set_ylabel("query position s")
    ax.set_title(title or "log10 dense attention (sum over heads); red: the indexer's top-k")
    if pieces is not None and S <= 64:
        ax.set_yticks(range(S), [repr(x)[1:-1][:8] for x in pieces[:S]], fontsize=6)
    return fig


def recall_curves(results: dict, labels: Optional[Sequence[str]] = None) -> Figure:
    """Recall against k (mean over heads and layers) for one or more ``selection_recall`` results,
    with the shared-set oracle and the recent-k window of the first."""
    results = results if isinstance(results, (list, tuple)) else [results]
    labels = labels or [f"indexer {i}" for i in range(len(results))]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    ks = results[0]["ks"]
    for r, lab in zip(results, labels):
        ax.plot(ks, r["recall"].mean(dim=(0, 1)).numpy(), "o-", label=lab)
    ax.plot(ks, results[0]["oracle"].mean(0).numpy(), "k--", label="oracle (best shared k keys)")
    ax.plot(ks, results[0]["recent"].mean(0).numpy(), ":", color="tab:gray", label="recent k (window)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (keys kept per query)")
    ax.set_ylabel("share of dense attention mass kept")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    rec = results[-1]["recall"]                                    # [L,H,K]
    for li, L in enumerate(results[-1]["layers"]):
        ax2.plot(ks, rec[li].mean(0).numpy(), "o-", label=f"layer {L}")
        lo, hi = rec[li].min(0).values.numpy(), rec[li].max(0).values.numpy()
        ax2.fill_between(ks, lo, hi, alpha=0.15)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("k")
    ax2.set_title(f"{labels[-1]}: per layer (band: min..max over heads)", fontsize=9)
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    return fig


def cost_curves(rows_by_model: dict, what: Sequence[str] = ("flops", "bytes"), title: str = "") -> Figure:
    """Per-token attention cost against context, one panel per quantity; ``rows_by_model`` maps a
    label to ``probes.dsa_cost.cost_curves`` rows (dense and sparse lines)."""
    fig = Figure(figsize=(5 * len(what), 3.8), layout="constrained")
    axes = fig.subplots(1, len(what))
    axes = axes if len(what) > 1 else [axes]
    for ax, w in zip(axes, what):
        for label, rows in rows_by_model.items():
            for mode in ("dense", "sparse"):
                pts = [(r["context"], r[w]) for r in rows if r["mode"] == mode]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, "-" if mode == "sparse" else "--", label=f"{label} {mode}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel({"flops": "attention FLOPs per token", "bytes": "cache bytes read per token",
                       "indexer_flops": "indexer FLOPs", "core_flops": "core attention FLOPs"}.get(w, w))
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def decode_speed(rows: Sequence[dict], title: str = "") -> Figure:
    """Measured decode tokens/s of dense and sparse attention against context (rows from
    ``bench.sparse``-style timing: context, dense_tok_s, sparse_tok_s)."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ctx = [r["context"] for r in rows]
    ax.plot(ctx, [r["dense_tok_s"] for r in rows], "o--", label="dense MLA (absorbed)")
    ax.plot(ctx, [r["sparse_tok_s"] for r in rows], "o-", label="DSA (indexer + top-k)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title(title or "decode speed on this CPU")
    ax.legend(fontsize=8)
    return fig
