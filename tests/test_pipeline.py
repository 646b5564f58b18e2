"""dsv3lab.pipeline_schedules: the event-simulated schedules against Table 2's formulas, written
out here by hand (not through table2_formula), and the schedules' invariants; and the experiment
(dsv3lab.experiments.pipeline) that records them, with its figures."""

import pytest

from dsv3lab import pipeline_schedules as P

# (F, B, W, F&B) with the input backward B - W equal to F and F&B >= B: where Table 2 applies.
EQUAL_CHUNKS = [(1.0, 2.0, 1.0, 3.0), (1.0, 2.0, 1.0, 2.5), (2.0, 3.0, 1.0, 4.0), (1.0, 1.5, 0.5, 2.0),
                (1.5, 2.5, 1.0, 2.5)]
SETTINGS = [(pp, k * pp) for pp in (2, 4, 6, 8, 16) for k in (2, 3)] + [(8, 20)]


@pytest.mark.parametrize("pp,m", SETTINGS)
@pytest.mark.parametrize("F,B,W,FB", EQUAL_CHUNKS)
def test_1f1b_and_zb1p_match_table2(pp, m, F, B, W, FB):
    a = P.simulate("1f1b", pp, m, F, B, W, FB).summary()
    assert a["bubble"] == pytest.approx((pp - 1) * (F + B))
    assert a["activation"] == pp and a["params"] == 1
    z = P.simulate("zb1p", pp, m, F, B, W, FB).summary()
    assert z["bubble"] == pytest.approx((pp - 1) * (F + B - 2 * W))
    assert z["activation"] == pp and z["params"] == 1


@pytest.mark.parametrize("pp,m", [s for s in SETTINGS if s[1] >= 2 * s[0]])
@pytest.mark.parametrize("F,B,W,FB", EQUAL_CHUNKS)
def test_dualpipe_matches_table2(pp, m, F, B, W, FB):
    d = P.simulate("dualpipe", pp, m, F, B, W, FB).summary()
    assert d["bubble"] == pytest.approx((pp / 2 - 1) * (FB + B - 3 * W), abs=1e-9)
    assert d["activation"] == pp + 1
    assert d["params"] == 2


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_dualpipe_with_a_short_input_backward_departs_from_the_formula(pp):
    # B - W = 0.5 < F = 1: the schedule waits F - (B - W) longer at each of the PP/2 - 1 hand-overs
    F, B, W, FB = 1.0, 1.0, 0.5, 1.5
    d = P.simulate("dualpipe", pp, 2 * pp, F, B, W, FB).summary()
    formula = (pp / 2 - 1) * (FB + B - 3 * W)
    assert d["bubble"] == pytest.approx(formula + (pp / 2 - 1) * (F - (B - W)))
    assert d["bubble"] > formula


def test_every_chunk_runs_once_after_its_dependencies():
    for name in P.SCHEDULES:
        pp, m = 6, 12
        tl = P.simulate(name, pp, m, 1.0, 2.0, 1.0, 2.5)
        end = {}
        seen = []
        for d, dev in enumerate(tl.tasks):
            last = 0.0
            for t in dev:
                assert t.start >= last - 1e-12, (name, d)            # one chunk at a time per device
                last = t.end
                for p in t.parts:
                    seen.append(p)
                    end[p] = t.end
                    if p[0] == "BW":
                        end[("B",) + p[1:]] = t.end
        assert len(seen) == len(set(seen))
        dirs = 2 if name == "dualpipe" else 1
        per_dir = m // dirs
        for dr in range(dirs):
            for s in range(pp):
                for j in range(per_dir):
                    assert ("F", dr, s, j) in end
                    assert ("B", dr, s, j) in end                    # as B or as the B of a BW
        starts = {p: t.start for dev in tl.tasks for t in dev for p in t.parts}
        for p, st in starts.items():
            kind, dr, s, j = p
            if kind == "F" and s > 0:
                assert st >= end[("F", dr, s - 1, j)] - 1e-12
            if kind in ("B", "BW") and s < pp - 1:
                assert st >= end[("B", dr, s + 1, j)] - 1e-12
            if kind == "W":
                assert st >= end[("B", dr, s, j)] - 1e-12


def test_dualpipe_devices_hold_two_stages_and_mirror():
    tl = P.simulate("dualpipe", 8, 20)
    for d, dev in enumerate(tl.tasks):
        stages = {(dr, s) for t in dev for (_, dr, s, _) in t.parts}
        assert stages == {(0, d), (1, 7 - d)}
    # device d and PP-1-d run the same shape of schedule, so they are equally busy
    assert tl.busy == tl.busy[::-1]


def test_bubble_does_not_depend_on_micro_batches_beyond_the_minimum():
    for name in P.SCHEDULES:
        b = [P.simulate(name, 8, m).summary()["bubble"] for m in (16, 24, 40)]
        assert b[0] == pytest.approx(b[1]) == pytest.approx(b[2])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="even"):
        P.simulate("dualpipe", 5, 10)
    with pytest.raises(ValueError, match="2\\*pp"):
        P.simulate("dualpipe", 8, 8)
    with pytest.raises(ValueError, match="unknown schedule"):
        P.simulate("gpipe", 4, 8)
    with pytest.raises(ValueError, match="W"):
        P.simulate("zb1p", 4, 8, F=1, B=1, W=2)


def test_experiment_protocol_and_figure():
    from matplotlib.figure import Figure
    from dsv3lab import experiments
    res = experiments.run("pipeline", quick=True, progress=False)
    assert res["seeds"] == [] and set(res["arms"]) == set(P.SCHEDULES)
    assert res["metrics"]["1f1b.bubble"]["mean"] == 15 * 3.0
    assert res["metrics"]["dualpipe.activation"]["mean"] == 17
    assert res["metrics"]["dualpipe.formula_max_bubble_dev"]["mean"] < 1e-9
    figs = experiments.figures("pipeline", res)
    assert figs and all(isinstance(f, Figure) for f in figs.values())
