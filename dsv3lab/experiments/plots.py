"""Figures of recorded experiment results: pure functions of the result dict returning a Figure.

  seed_band_curves    one series per arm over steps: the mean over seeds, a min-max band
  balancing_heatmaps  expert load / mean load of the first MoE layer over training, one panel per arm
"""

from __future__ import annotations

from typing import Optional, Sequence


def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout="constrained")


def seed_band_curves(result: dict, series: str, arms: Optional[Sequence[str]] = None, ylabel: str = "",
                     smooth: int = 1, ceiling: Optional[float] = None, percent: bool = False,
                     hline: Optional[float] = None, hline_label: str = "", title: Optional[str] = None):
    """``result["series"]["<arm>.<series>"]`` for each arm: mean over seeds as a line, the band
    between the lowest and highest seed shaded. ``smooth`` > 1 applies a trailing moving average to
    each seed first; ``percent`` plots values x 100; ``ceiling`` / ``hline`` draw reference lines."""
    from dsv3lab.train.log import smooth as _smooth
    arms = list(arms or result["arms"])
    fig = _figure(7.5, 3.8)
    ax = fig.subplots()
    k = 100.0 if percent else 1.0
    drawn = 0
    for i, arm in enumerate(arms):
        s = result["series"].get(f"{arm}.{series}")
        if s is None:
            continue
        curves = [[k * float(v) for v in (_smooth(c, smooth) if smooth > 1 else c)] for c in s["per_seed"]]
        n = min(len(c) for c in curves)
        mean = [sum(c[j] for c in curves) / len(curves) for j in range(n)]
        lo = [min(c[j] for c in curves) for j in range(n)]
        hi = [max(c[j] for c in curves) for j in range(n)]
        ax.plot(range(n), mean, color=f"C{i}", lw=1.6, label=f"{arm} (mean of {len(curves)} seeds)")
        ax.fill_between(range(n), lo, hi, color=f"C{i}", alpha=0.2, lw=0)
        drawn += 1
    if drawn == 0:
        raise KeyError(f"result {result.get('name')!r} has no series {series!r} for arms {arms}")
    if ceiling is not None:
        ax.axhline(k * ceiling, color="k", lw=0.8, ls=":", label=f"ceiling {ceiling:g}")
    if hline is not None:
        ax.axhline(k * hline, color="k", lw=0.8, ls="--", label=hline_label or f"{k * hline:g}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{result['name']}: {series}", fontsize=9)
    return fig


def balancing_heatmaps(result: dict, seed_index: int = 0, series: str = "load_heatmap"):
    """One panel per arm: rows are equal slices of training, columns experts, colour the expert's
    share of the first MoE layer's load divided by the mean share (1 = even; 0 = never chosen)."""
    arms = [a for a in result["arms"] if f"{a}.{series}" in result["series"]]
    if not arms:
        raise KeyError(f"result {result.get('name')!r} has no {series!r} series")
    fig = _figure(3.2 * len(arms) + 0.8, 3.6)
    axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    steps = result["config"]["train"]["steps"]
    vmax = max(max(max(row) for row in result["series"][f"{a}.{series}"]["per_seed"][seed_index]) for a in arms)
    im = None
    for ax, arm in zip(axes, arms):
        grid = result["series"][f"{arm}.{series}"]["per_seed"][seed_index]
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest",
                       extent=(-0.5, len(grid[0]) - 0.5, steps, 0))
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("training step")
    fig.colorbar(im, ax=list(axes), label="load / mean load (first MoE layer)")
    fig.suptitle(f"expert load over training, seed {result['seeds'][seed_index] if result['seeds'] else '-'}",
                 fontsize=10)
    return fig
