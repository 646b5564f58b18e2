"""Figures of the pipeline schedules (``dsv3lab.pipeline_schedules``): pure functions returning a Figure.

  fig_timelines      one panel per schedule: devices down, time across, one box per chunk
  fig_bubble_vs_pp   the simulated bubble against Table 2's formula over the number of stages
"""

from __future__ import annotations

from dsv3lab.pipeline_schedules import SCHEDULES, simulate, table2_formula

COLORS = {"F": "#f4a261", "B": "#2a9d8f", "W": "#457b9d", "BW": "#52b788", "FB": "#e76f51"}


def fig_timelines(timelines, title: str = ""):
    """One panel per schedule: devices down, time across, one box per chunk (F, B input-backward,
    W weight-backward, BW full backward, F&B overlapped), labelled with the micro-batch (the
    reverse direction's in white). A pure function returning a matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    span = max(t.makespan for t in timelines)
    pp = max(t.pp for t in timelines)
    fig = Figure(figsize=(12, 1.0 + 0.28 * pp * len(timelines)), layout="constrained")
    axes = fig.subplots(len(timelines), 1, squeeze=False)[:, 0]
    for ax, tl in zip(axes, timelines):
        for d, dev in enumerate(tl.tasks):
            for t in dev:
                key = "FB" if len(t.parts) == 2 else t.parts[0][0]
                ax.broken_barh([(t.start, t.duration)], (d - 0.4, 0.8), facecolors=COLORS[key],
                               edgecolor="k", linewidth=0.4)
                if t.duration >= 0.5:
                    label = "/".join(str(p[3]) for p in t.parts)
                    ax.text(t.start + t.duration / 2, d, label, ha="center", va="center", fontsize=5.5,
                            color="white" if t.parts[0][1] == 1 else "black")
        s = tl.summary()
        ax.set_title(f"{tl.name}: PP={tl.pp}, {tl.micro_batches} micro-batches -- bubble {s['bubble']:g}, "
                     f"peak activation {s['activation']}, params {max(tl.params)}x", fontsize=9, loc="left")
        ax.set_xlim(0, span)
        ax.set_ylim(tl.pp - 0.5, -0.5)
        ax.set_yticks(range(tl.pp), [f"dev {d}" for d in range(tl.pp)], fontsize=6)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("time (units of F)")
    names = dict(F="F", B="B (input grad)", W="W (weight grad)", BW="B full", FB="F&B overlapped")
    fig.legend(handles=[Patch(facecolor=c, edgecolor="k", label=names[k]) for k, c in COLORS.items()],
               loc="outside lower center", ncols=5, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def fig_bubble_vs_pp(durations: dict, pps=(2, 4, 6, 8, 12, 16, 24, 32), per_stage: int = 2):
    """Simulated bubble (dots) against Table 2's formula (lines) for each schedule over PP."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 3.4), layout="constrained")
    ax = fig.subplots()
    for i, name in enumerate(SCHEDULES):
        sim = [simulate(name, pp, per_stage * pp, **durations).summary()["bubble"] for pp in pps]
        ax.plot(pps, [table2_formula(name, pp, **durations)["bubble"] for pp in pps], color=f"C{i}",
                label=f"{name}: Table 2 formula")
        ax.plot(pps, sim, "o", color=f"C{i}", mfc="none", label=f"{name}: simulated")
    d = durations
    ax.set_xlabel("pipeline stages PP")
    ax.set_ylabel("bubble (units of F)")
    ax.set_title(f"F={d['F']:g}, B={d['B']:g}, W={d['W']:g}, F&B={d['FB']:g}; {per_stage} micro-batches per stage",
                 fontsize=9, loc="left")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncols=2)
    return fig
