"""Figures for ``dsv3lab.interp``: pure functions, data in, a matplotlib ``Figure`` out (never
``plt.show``; headless on Agg)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from matplotlib.figure import Figure


def _np(x):
    return (x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x)).double().numpy()


def _labels(pieces: Optional[Sequence[str]], n: int) -> list[str]:
    if pieces is None:
        return [str(i) for i in range(n)]
    return [repr(p)[1:-1][:10] for p in pieces][:n]


def lens_heatmap(stats: dict, pieces: Optional[Sequence[str]] = None, row_names: Optional[Sequence[str]] = None,
                 b: int = 0, value: str = "prob", top_pieces: Optional[Sequence[Sequence[str]]] = None,
                 title: Optional[str] = None) -> Figure:
    """Rows (lens rows: blocks, MTP) x positions of ``next_token_stats`` ``value`` (default the
    probability of the true next token); ``pieces`` label the positions (the token read there),
    ``top_pieces[r][j]`` (optional) is written in each cell (the row's top prediction). Cells
    with no value (NaN: an MTP row, aligned by target, has no prediction at its first 1+k
    positions, by design) are grey and read "n/a", and the title says so."""
    import matplotlib
    data = _np(stats[value][:, b])
    R, S = data.shape
    fig = Figure(figsize=(min(2.5 + (0.8 if top_pieces is not None else 0.6) * S, 18), 1.0 + 0.5 * R),
                 layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["magma" if value == "prob" else "viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(data, aspect="auto", cmap=cmap,
                   vmin=0 if value == "prob" else None, vmax=1 if value == "prob" else None, interpolation="nearest")
    ax.set_xticks(range(S), _labels(pieces, S), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(R), list(row_names) if row_names is not None else [f"block {r}" for r in range(R)])
    ax.set_xlabel("position (token read there); the target is the next token")
    if top_pieces is not None:
        for r in range(R):
            for j in range(S):
                empty = data[r, j] != data[r, j]
                ax.text(j, r, "n/a" if empty else repr(top_pieces[r][j])[1:-1][:6], ha="center", va="center",
                        fontsize=8, color="white" if (not empty and data[r, j] < 0.5) else "black")
    fig.colorbar(im, ax=ax, label={"prob": "p(true next token)", "rank": "rank of true next token",
                                   "entropy": "entropy (nats)", "kl_to_final": "KL to final (nats)"}.get(value, value))
    n_empty = int((data != data).sum())
    ax.set_title((title or "Logit lens") + (f"  (grey: {n_empty} cell(s) with no prediction, by design)" if n_empty else ""))
    return fig


def patching_heatmap(result, pieces: Optional[Sequence[str]] = None, title: Optional[str] = None) -> Figure:
    """Layer x position (or MoE layer x expert) heatmap of a ``PatchResult``'s normalised scores."""
    data = _np(result.scores)
    R, C = data.shape
    fig = Figure(figsize=(min(2.5 + 0.45 * C, 16), 1.0 + 0.4 * R), layout="constrained")
    ax = fig.add_subplot()
    peak = float(abs(data).max()) if data.size else 0.0
    # one expert recovers a small fraction: its range is scaled to the data (symmetric about 0)
    # so it is not a white sheet on -1..1; the other hooks keep -1..1, where 1 means "clean"
    lim = max(peak, 1e-6) if result.hook == "expert" else max(1.0, peak)
    im = ax.imshow(data, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
    if result.hook == "expert":
        ax.set_xlabel("routed expert")
        if C > 16:
            ax.set_xticks(range(0, C, 4), [str(result.cols[i]) for i in range(0, C, 4)])
        else:
            ax.set_xticks(range(C), [str(c) for c in result.cols])
    else:
        ax.set_xlabel("position")
        ax.set_xticks(range(C), _labels([pieces[c] for c in result.cols] if pieces is not None else None, C),
                      rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(R), [str(r) for r in result.rows])
    ax.set_ylabel("block")
    fig.colorbar(im, ax=ax, label="recovered (0 corrupted, 1 clean)"
                 + (f"\ncolour range ±{lim:.2g} = max |score|" if result.hook == "expert" else ""))
    ax.set_title(title or f"Activation patching: {result.hook}")
    return fig


def importance_heatmap(imp: dict, title: Optional[str] = None, n_group: Optional[int] = None) -> Figure:
    """MoE layer x expert heatmap of ``expert_importance``'s loss change, with each layer's
    load share as a second panel."""
    delta, load = _np(imp["delta"]), _np(imp["load"])
    L, E = delta.shape
    fig = Figure(figsize=(min(3 + 0.22 * E, 15), 1.8 + 0.7 * L), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    lim = float(abs(delta).max()) or 1.0
    im = axes[0].imshow(delta, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], label="loss change (nats)")
    im2 = axes[1].imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im2, ax=axes[1], label="share of routed slots")
    for ax in axes:
        ax.set_yticks(range(L), [str(l) for l in imp["layers"]])
        ax.set_ylabel("block")
        if n_group and n_group > 1:
            for g in range(1, n_group):
                ax.axvline(g * E / n_group - 0.5, color="white", lw=0.8, alpha=0.7)
    axes[1].set_xlabel("routed expert")
    axes[0].set_title(title or f"Expert importance ({imp['mode']}), base loss {imp['base']:.3f}")
    return fig


def specialisation_heatmap(spec, layer_index: int, classes: Optional[Sequence[str]] = None,
                           value: str = "lift", title: Optional[str] = None) -> Figure:
    """Class x expert heatmap of one MoE layer: ``lift`` (log2 scale) or ``p_expert_given_class``;
    the right panel is each expert's JSD (bits) between its class mix and the corpus's."""
    classes = list(classes) if classes is not None else list(spec.classes)
    idx = [spec.classes.index(c) for c in classes]
    if value == "lift":
        data = _np(spec.lift[layer_index, idx].clamp_min(1e-3).log2())
        label, cmap, lim = "log2 lift P(e|class)/P(e)", "RdBu_r", 3.0
    else:
        data = _np(spec.p_expert_given_class[layer_index, idx])
        label, cmap, lim = "P(expert | class)", "viridis", None
    C, E = data.shape
    fig = Figure(figsize=(min(4 + 0.22 * E, 16), 1.6 + 0.35 * C + 1.2), layout="constrained")
    axes = fig.subplots(2, 1, height_ratios=[max(C, 1), 2], sharex=True)
    im = axes[0].imshow(data, aspect="auto", cmap=cmap, vmin=-lim if lim else None, vmax=lim, interpolation="nearest")
    axes[0].set_yticks(range(C), classes, fontsize=8)
    fig.colorbar(im, ax=axes[0], label=label)
    jsd = _np(spec.jsd_expert[layer_index])
    axes[1].bar(range(E), jsd, color="tab:purple")
    axes[1].set_ylabel("JSD (bits)")
    axes[1].set_xlabel("routed expert")
    axes[0].set_title(title or f"Expert specialisation, block {spec.layers[layer_index]}")
    return fig


def coactivation_heatmap(co: dict, pair_index: int, layers: Optional[Sequence[int]] = None,
                         title: Optional[str] = None) -> Figure:
    """Expert-in-layer-l x expert-in-layer-l+1 lift (log2) of ``coactivation``."""
    data = _np(co["lift"][pair_index].nan_to_num(nan=1.0).clamp_min(1e-3).log2())
    E = data.shape[0]
    fig = Figure(figsize=(6.2, 5.2), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap="RdBu_r", vmin=-3, vmax=3, interpolation="nearest")
    a, b = (layers[pair_index], layers[pair_index + 1]) if layers is not None else (pair_index, pair_index + 1)
    ax.set_xlabel(f"expert in block {b}")
    ax.set_ylabel(f"expert in block {a}")
    fig.colorbar(im, ax=ax, label="log2 lift over independent layers")
    ax.set_title(title or f"Co-activation, blocks {a} -> {b}")
    return fig


def attribution_bars(rows: Sequence[dict], total: Optional[float] = None, title: Optional[str] = None) -> Figure:
    """Horizontal bars of ``Attribution.table`` rows (largest first)."""
    names = []
    for r in rows:
        if r["layer"] is None:
            names.append(r["component"])
        elif r["component"] == "expert":
            names.append(f"block {r['layer']} expert {r['expert']}")
        else:
            names.append(f"block {r['layer']} {r['component']}")
    vals = [r["value"] for r in rows]
    fig = Figure(figsize=(6.5, 0.8 + 0.28 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(range(len(rows)), vals, color=["tab:red" if v < 0 else "tab:blue" for v in vals])
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("contribution to the target logit")
    ax.set_title(title or (f"Direct logit attribution (logit {total:.2f})" if total is not None
                           else "Direct logit attribution"))
    return fig


def loss_bars(values: dict, title: Optional[str] = None, unit: str = "nats") -> Figure:
    """Bars of named losses (e.g. the replay decomposition)."""
    names = list(values)
    fig = Figure(figsize=(1.8 + 1.3 * len(names), 3.2), layout="constrained")
    ax = fig.add_subplot()
    vals = [values[n] for n in names]
    ax.bar(range(len(names)), vals, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title or "")
    return fig
