"""The pipeline-schedule experiment: Table 2 (bubble, parameters, activations of 1F1B, ZB1P and
DualPipe) re-measured by event simulation at PP = 16, and the paper's formulas checked over a grid.

The simulator is ``dsv3lab.pipeline_schedules`` (how a schedule is written and timed); the figures
are in ``pipeline_plots``. Deterministic: run once, no seeds.
"""

from __future__ import annotations

from dsv3lab.pipeline_schedules import SCHEDULES, simulate, table2_formula

NAME = "pipeline"
TITLE = "pipeline schedules 1F1B / ZB1P / DualPipe, event-simulated: bubble, parameters, activations"
PAPER = "DeepSeek-V3 report sec. 3.2.1, Table 2 (and the deepseek-ai/DualPipe README)"
ARMS = SCHEDULES
SEEDED = False                    # deterministic: run once

# Chunk durations in units of one forward chunk. The report gives none; B = 2F and W = B/2 (so the
# input backward B - W equals F) is the usual cost model, F&B = F + B means the overlap hides the
# communication but not the compute.
EQUAL = dict(F=1.0, B=2.0, W=1.0, FB=3.0)
# A second model where the input backward (0.5) is shorter than the forward (1): the DualPipe
# formula stops describing the simulated schedule (see ``formula_check``).
UNEQUAL = dict(F=1.0, B=1.0, W=0.5, FB=1.5)


def config(quick: bool) -> dict:
    grid_pp = [4, 8] if quick else [2, 4, 6, 8, 12, 16]
    return dict(pp=16, micro_batches=32, durations=EQUAL, unequal_durations=UNEQUAL,
                check_pp=grid_pp, check_micro_batch_factors=[2, 3] if quick else [2, 3, 4],
                check_durations=[EQUAL, dict(F=1.0, B=2.0, W=1.0, FB=2.5), dict(F=2.0, B=3.0, W=1.0, FB=4.0),
                                 dict(F=1.5, B=2.5, W=1.0, FB=2.5), dict(F=1.0, B=1.5, W=0.5, FB=2.0)])


def scale(cfg: dict) -> str:
    d = cfg["durations"]
    return (f"event simulation, PP={cfg['pp']}, {cfg['micro_batches']} micro-batches (DualPipe: half from "
            f"each end), F={d['F']:g} B={d['B']:g} W={d['W']:g} F&B={d['FB']:g} time units, no communication cost")


def formula_check(name: str, pps, factors, durations) -> dict:
    """Largest |simulated - Table 2| of bubble and activation over a grid of settings."""
    dev_b = dev_a = 0.0
    n = 0
    for pp in pps:
        for k in factors:
            m = k * pp
            for d in durations:
                s = simulate(name, pp, m, **d).summary()
                f = table2_formula(name, pp, **d)
                dev_b = max(dev_b, abs(s["bubble"] - f["bubble"]))
                dev_a = max(dev_a, abs(s["activation"] - f["activation"]))
                n += 1
    return dict(max_bubble_dev=dev_b, max_activation_dev=dev_a, settings=n)


def run_arm(cfg: dict, arm: str, seed) -> dict:
    tl = simulate(arm, cfg["pp"], cfg["micro_batches"], **cfg["durations"])
    un = simulate(arm, cfg["pp"], cfg["micro_batches"], **cfg["unequal_durations"])
    s, u = tl.summary(), un.summary()
    chk = formula_check(arm, cfg["check_pp"], cfg["check_micro_batch_factors"], cfg["check_durations"])
    stages = [len({(dr, st) for t in dev for (_, dr, st, _) in t.parts}) for dev in tl.tasks]
    return dict(metrics=dict(bubble=s["bubble"], makespan=s["makespan"], activation=s["activation"],
                             params=max(stages), pending_w=s["pending_w"], bubble_unequal=u["bubble"],
                             formula_max_bubble_dev=chk["max_bubble_dev"],
                             formula_max_activation_dev=chk["max_activation_dev"],
                             formula_settings=chk["settings"]),
                series=dict(bubble_per_device=s["bubble_per_device"],
                            activation_per_device=s["activation_per_device"]))


def figures(result: dict) -> dict:
    """The schedules at the README's example size (8 devices, 20 micro-batches) with the
    result's durations: the PP = 16 picture is too dense to read."""
    from dsv3lab.experiments.pipeline_plots import fig_bubble_vs_pp, fig_timelines
    d = result["config"]["durations"]
    tls = [simulate(name, 8, 20, **d) for name in SCHEDULES]
    return {"pipeline schedules (PP=8, 20 micro-batches)": fig_timelines(tls),
            "bubble against PP": fig_bubble_vs_pp(d),
            "bubble against PP, input backward shorter than the forward":
                fig_bubble_vs_pp(result["config"]["unequal_durations"])}
