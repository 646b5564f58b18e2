"""Figures of the balancing experiment's result: pure functions of the result dict -> Figure.

  sweep      MaxVio_global and the val-loss cost against gamma / alpha, one line per scheme, seed
             min-max as error bars, the papers' MaxVio_global as reference lines
  curves     one series over training for each scheme at its best setting (and none): the mean
             over seeds, the min-max band shaded
  heatmaps   load / mean load per expert, one panel per scheme at its best setting
"""

from __future__ import annotations

from typing import Optional

from dsv3lab.experiments import balancing as B

COLOURS = {"aux_free": "C0", "seq_aux": "C1", "batch_aux": "C2", "none": "C3"}
LFB = {"aux_free": 0.04, "seq_aux": 0.72}        # loss-free balancing paper, 1B: bias / aux loss


def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout="constrained")


def sweep(result: dict, floor: Optional[float] = None):
    """Left: validation MaxVio_global against the setting (log x; gamma for aux_free, alpha for the
    losses), mean over seeds with the seed min-max as error bars, the best setting ringed. Right:
    the paired val-loss cost against no balancing."""
    fig = _figure(11, 4)
    ax, ax2 = fig.subplots(1, 2)
    best = B.best_arms(result)
    m = result["metrics"]
    for scheme in ("aux_free", "seq_aux", "batch_aux"):
        pts = B.arms_of(result, scheme)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        mean = [m[f"{a}.maxvio_global"]["mean"] for _, a in pts]
        err = [[mu - m[f"{a}.maxvio_global"]["min"] for mu, (_, a) in zip(mean, pts)],
               [m[f"{a}.maxvio_global"]["max"] - mu for mu, (_, a) in zip(mean, pts)]]
        label = f"{scheme} ({'gamma' if scheme == 'aux_free' else 'alpha'})"
        ax.errorbar(xs, mean, yerr=err, color=COLOURS[scheme], marker="o", capsize=3, label=label)
        for x, a in pts:
            if best.get(scheme) == a:
                ax.plot([x], [m[f"{a}.maxvio_global"]["mean"]], "o", ms=13, mfc="none", color=COLOURS[scheme])
        if "none.val_loss" in m:
            ax2.plot(xs, [B._paired_loss_cost(result, a) for _, a in pts], color=COLOURS[scheme], marker="o",
                     label=label)
    if "none.maxvio_global" in m:
        ax.axhline(m["none.maxvio_global"]["mean"], color=COLOURS["none"], lw=1, label="none")
    for scheme, v in LFB.items():
        ax.axhline(v, color=COLOURS[scheme], ls="--", lw=0.9,
                   label=f"LFB 1B, {'bias' if scheme == 'aux_free' else 'aux loss'}: {v}")
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=0.9, label=f"uniform routing, same tokens: {floor:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gamma (bias step) or alpha (aux-loss weight)")
    ax.set_ylabel("validation MaxVio_global (mean over MoE layers)")
    ax.set_title(f"the sweep, {len(result['seeds'])} seeds (ringed: best setting)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax2.axhline(0, color="k", lw=0.6)
    ax2.set_xscale("log")
    ax2.set_xlabel("gamma or alpha")
    ax2.set_ylabel("val loss - val loss (none), paired (nats/token)")
    ax2.set_title("what the balance costs in validation loss", fontsize=9)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    return fig


def curves(result: dict, series: str, ylabel: str = "", floor: Optional[float] = None, log: bool = True):
    """``series`` over training for each scheme at its best setting and ``none``: mean over seeds,
    min-max band. The x axis is the step (points are every ``BLOCK`` steps); the dotted vertical
    line is where gamma goes to 0."""
    best = B.best_arms(result)
    steps = result["config"]["train"]["steps"]
    fig = _figure(7.5, 3.8)
    ax = fig.subplots()
    for scheme, arm in best.items():
        s = result["series"].get(f"{arm}.{series}")
        if s is None:
            continue
        curves_ = s["per_seed"]
        n = min(len(c) for c in curves_)
        xs = [min(steps, (i + 1) * B.BLOCK) for i in range(n)]
        mean = [sum(c[j] for c in curves_) / len(curves_) for j in range(n)]
        ax.plot(xs, mean, color=COLOURS[scheme], lw=1.5, label=f"{arm} (mean of {len(curves_)} seeds)")
        ax.fill_between(xs, [min(c[j] for c in curves_) for j in range(n)],
                        [max(c[j] for c in curves_) for j in range(n)], color=COLOURS[scheme], alpha=0.2, lw=0)
    ax.axvline(B.freeze_step(steps), color="k", ls=":", lw=0.8, label="gamma -> 0")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=0.8, label=f"uniform routing: {floor:.2f}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"{series}: each scheme at its best setting", fontsize=9)
    return fig


def heatmaps(result: dict, series: str = "load_heatmap", seed_index: int = 0):
    """One panel per scheme at its best setting: load / mean load per expert. ``load_heatmap``:
    rows are equal slices of training, first MoE layer; ``val_load``: rows are the MoE layers,
    the validation set at the end."""
    best = B.best_arms(result)
    arms = [a for a in best.values() if f"{a}.{series}" in result["series"]]
    if not arms:
        raise KeyError(f"result {result.get('name')!r} has no {series!r} series")
    fig = _figure(3.0 * len(arms) + 0.8, 3.0 if series == "val_load" else 3.6)
    axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    grids = [result["series"][f"{a}.{series}"]["per_seed"][seed_index] for a in arms]
    vmax = max(max(max(r) for r in g) for g in grids)
    steps = result["config"]["train"]["steps"]
    im = None
    for ax, arm, grid in zip(axes, arms, grids):
        extent = ((-0.5, len(grid[0]) - 0.5, steps, 0) if series == "load_heatmap"
                  else (-0.5, len(grid[0]) - 0.5, len(grid) - 0.5, -0.5))
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest", extent=extent)
        ax.set_title(arm, fontsize=8)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("training step" if series == "load_heatmap" else "MoE layer")
    fig.colorbar(im, ax=list(axes), label="load / mean load")
    what = "first MoE layer over training" if series == "load_heatmap" else "validation set, after training"
    fig.suptitle(f"expert load, {what}, seed {result['seeds'][seed_index]}", fontsize=9)
    return fig
