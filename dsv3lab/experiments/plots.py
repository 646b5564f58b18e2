"""Figures of recorded experiment results: pure functions of the result dict returning a Figure.

  figures             {title: Figure} of one experiment's result (its module's ``figures``)
  seed_band_curves    one series per arm over steps: the mean over seeds, a min-max band

The balancing experiment's own figures (sweep, curves at each scheme's best setting, load
heatmaps) are in ``balancing_plots``, the pipeline schedules' (timelines, bubble against PP) in
``pipeline_plots``.
"""

from __future__ import annotations

from typing import Optional, Sequence

from dsv3lab.experiments.registry import module
from dsv3lab.experiments.results import load_result, result_path


def figures(name: str, result: Optional[dict] = None) -> dict:
    """{title: matplotlib Figure} of a result (the recorded one by default)."""
    mod = module(name)
    result = result if result is not None else load_result(name)
    if result is None:
        raise FileNotFoundError(f"no recorded result for {name!r} at {result_path(name)}; "
                                f"run `python -m dsv3lab experiment {name}`")
    return mod.figures(result) if hasattr(mod, "figures") else {}


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
