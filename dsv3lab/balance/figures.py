"""Figures for load balancing: pure functions of tensors/lists, each returning a matplotlib Figure."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from dsv3lab.probes.metrics import balancedness


def _plt():
    import matplotlib.pyplot as plt
    return plt


def relative_load_by_layer(loads: Mapping[str, torch.Tensor], layer_names: Optional[Sequence] = None,
                           title: Optional[str] = None):
    """One panel per condition (e.g. "trained biases", "biases zeroed"): each MoE layer's expert
    load divided by the mean, experts sorted hottest first. 1 = an even share; MaxVio is the
    height of the first point minus 1."""
    plt = _plt()
    n = len(loads)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.6), sharey=True, squeeze=False)
    for ax, (label, load) in zip(axes[0], loads.items()):
        load = torch.as_tensor(load).double()
        rel = load / load.mean(-1, keepdim=True).clamp_min(1e-12)
        rel = rel.sort(-1, descending=True).values
        names = layer_names or list(range(rel.shape[0]))
        for i in range(rel.shape[0]):
            ax.plot(range(rel.shape[1]), rel[i].tolist(), marker=".", lw=1,
                    label=f"layer {names[i]}  MaxVio {float(rel[i, 0] - 1):.2f}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(label)
        ax.set_xlabel("expert rank (hottest first)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("load / mean load")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def maxvio_curves(curves: Mapping[str, Sequence[float]], smooth: int = 1,
                  title: Optional[str] = None, ceiling: Optional[float] = None):
    """MaxVio per training step for each run (moving average over ``smooth`` steps; raw in
    faint). ``ceiling`` draws the largest possible MaxVio (E/k - 1: every token on the same k
    experts)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for label, ys in curves.items():
        ys = [float(y) for y in ys]
        line, = ax.plot(range(len(ys)), ys, lw=0.6, alpha=0.35)
        if smooth > 1 and len(ys) >= smooth:
            k = torch.ones(smooth, dtype=torch.float64) / smooth
            sm = torch.nn.functional.conv1d(torch.tensor(ys, dtype=torch.float64)[None, None], k[None, None])[0, 0]
            ax.plot(range(smooth - 1, len(ys)), sm.tolist(), color=line.get_color(), lw=2, label=label)
        else:
            line.set_label(label)
    if ceiling is not None:
        ax.axhline(ceiling, color="k", lw=0.8, ls=":", label=f"ceiling E/k - 1 = {ceiling:g}")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio of the batch (mean over MoE layers)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def gpu_load_bars(per_gpu: Mapping[str, torch.Tensor], gpus_per_node: Optional[int] = None,
                  title: Optional[str] = None):
    """Grouped bars of load per GPU for several placements (e.g. contiguous vs EPLB), each
    labelled with its balancedness (mean / max); dotted lines separate nodes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    n = len(per_gpu)
    width = 0.8 / n
    for j, (label, loads) in enumerate(per_gpu.items()):
        x = torch.as_tensor(loads).double()
        bal = float(balancedness(x))
        ax.bar([g - 0.4 + width * (j + 0.5) for g in range(len(x))], x.tolist(), width=width,
               label=f"{label}  (balancedness {bal:.3f})")
    first = torch.as_tensor(next(iter(per_gpu.values()))).double()
    ax.axhline(float(first.mean()), color="k", lw=0.8, ls="--", label="mean")
    if gpus_per_node:
        for b in range(gpus_per_node, len(first), gpus_per_node):
            ax.axvline(b - 0.5, color="gray", lw=0.8, ls=":")
    ax.set_xticks(range(len(first)))
    ax.set_xlabel("GPU" + (f" ({gpus_per_node} per node)" if gpus_per_node else ""))
    ax.set_ylabel("tokens computed")
    # above the axes, not over the bars (the hottest GPU's bar reaches the top of the plot)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=1, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
