"""dsv3lab.experiments and the training pieces they compare, against hand computations:
the simulated FP8 Linear (forward and both backward GEMMs) against a reference built directly
from dsv3lab.fp8's quantizers, GEMM-precision switching, the loop's balance losses on a case
worked by hand, the bias update's sign, the result schema, and quick runs of each experiment."""

import dataclasses
import json
import math
import re

import pytest
import torch

import dsv3lab
from dsv3lab import experiments as X
from dsv3lab.fp8 import act_dequant, act_quant, weight_dequant, weight_quant
from dsv3lab.train import TrainConfig
from dsv3lab.train.fp8_linear import gemm_precision, quant_linear

CFG = dsv3lab.ModelConfig.preset("tiny")


# ------------------------------------------------------------------------------- FP8 linear

def _pad_rows(t, b=128):
    pad = (-t.shape[0]) % b
    return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t


def _tiles_along_last(t):
    """1x128 tiles along the last axis, via dsv3lab.fp8 directly (zero-padded to whole tiles)."""
    K = t.shape[1]
    tp = torch.nn.functional.pad(t, (0, (-K) % 128))
    return act_dequant(*act_quant(tp, 128), 128)[:, :K]


def _tiles_along_first(t):
    """128x1 tiles (along the first axis): the transpose's 1x128 tiles."""
    return _tiles_along_last(t.t().contiguous()).t()


def _blocks(w):
    return weight_dequant(*weight_quant(w, 128), 128)


def _bf16(t):
    return t.to(torch.bfloat16).float()


@pytest.fixture
def operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 256, generator=g)          # M = 200: not a multiple of 128
    x[3, 7] = 300.0                                  # an outlier in one tile
    w = torch.randn(192, 256, generator=g) * 0.05    # N = 192: a partial block
    dy = torch.randn(200, 192, generator=g) * 1e-2
    return x, w, dy


def test_fp8_linear_forward_and_backward_match_the_recipe(operands):
    x, w, dy = operands
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = quant_linear(xr, wr, "fp8")
    y.backward(dy)
    # Fprop: 1x128 tiles of x, 128x128 blocks of W, fp32 GEMM, BF16 output
    y_ref = _bf16(_tiles_along_last(x) @ _blocks(w).t())
    # Dgrad: 1x128 tiles of dy along N, the same FP8 weight; Wgrad: 128x1 tiles of dy and x
    dx_ref = _bf16(_tiles_along_last(dy) @ _blocks(w))
    dw_ref = _tiles_along_first(dy).t() @ _tiles_along_first(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, dx_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wr.grad, dw_ref, rtol=1e-5, atol=1e-6)
    # and it is quantized: a relative error at e4m3's level, not zero, not garbage
    exact = x @ w.t()
    rel = float((y.detach() - exact).norm() / exact.norm())
    assert 1e-3 < rel < 0.1, rel
    assert y.shape == (200, 192) and y.dtype == torch.float32


def test_fp8_linear_keeps_leading_dims_and_other_modes(operands):
    x, w, dy = operands
    x3 = x[:192].reshape(4, 48, 256)
    y = quant_linear(x3, w, "fp8")
    torch.testing.assert_close(y.reshape(192, 192), quant_linear(x[:192], w, "fp8"))
    # bf16: operands and output rounded to bf16, fp32 accumulation
    torch.testing.assert_close(quant_linear(x, w, "bf16"), _bf16(_bf16(x) @ _bf16(w).t()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quant_linear(x, w, "fp32"), x @ w.t())
    with pytest.raises(ValueError, match="gemm precision"):
        quant_linear(x, w, "fp4")


def test_granularity_matters_with_an_outlier():
    """One outlier in row 0 sets a per-tensor scale that flushes a small row to zero; 1x128
    tiles give that row its own scale."""
    x = torch.full((4, 128), 1e-3)
    x[0, 0] = 1e4
    w = torch.eye(128)
    fine = quant_linear(x, w, "fp8")
    coarse = quant_linear(x, w, "fp8_tensor")
    torch.testing.assert_close(fine[1:], x[1:], rtol=0.07, atol=0)
    assert float(coarse[1:].abs().max()) == 0.0


def test_gemm_precision_swaps_eligible_linears_and_restores():
    model = dsv3lab.build(CFG, seed=0)
    tokens = torch.randint(2, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens)
        with gemm_precision(model, "fp8") as names:
            quant = model(tokens)
        after = model(tokens)
    assert torch.equal(before, after)
    assert names and not any(n.endswith(("lm_head", "eh_proj")) or "gate" == n.split(".")[-1] for n in names)
    assert any(".experts." in n for n in names) and any("self_attn" in n for n in names)
    rel = float((quant - before).norm() / before.norm())
    assert 0 < rel < 0.05, rel


# ------------------------------------------------------------------------ balance in the loop

def test_loop_balance_losses_by_hand():
    """E = 4, k = 2, two sequences of two tokens. Sequence 0 routes both tokens to {0, 1},
    sequence 1 both to {2, 3}; scores are uniform (P_i = 1/4 for every sequence).
    Sequence-wise: f = E/(kT) * counts = 4/4 * [2,2,0,0] = [2,2,0,0] -> sum f P = 1 per sequence.
    Batch-wise: counts [2,2,2,2] over T = 4 -> f = 4/8 * 2 = 1 each -> sum f P = 1 as well;
    with scores peaked on the chosen experts the two differ."""
    from dsv3lab.train.loop import _balance_loss
    ids = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3]])
    flat = torch.full((4, 4), 0.5)
    seq = TrainConfig(batch_size=2, aux_kind="sequence")
    bat = TrainConfig(batch_size=2, aux_kind="batch")
    assert float(_balance_loss(seq, flat, ids, 2)) == pytest.approx(1.0)
    assert float(_balance_loss(bat, flat, ids, 2)) == pytest.approx(1.0)
    # peaked: s = 0.9 on the chosen two, 0.1 elsewhere -> P per sequence [0.45,0.45,0.05,0.05]
    peaked = torch.tensor([[.9, .9, .1, .1], [.9, .9, .1, .1], [.1, .1, .9, .9], [.1, .1, .9, .9]])
    # sequence-wise: f = [2,2,0,0] -> 2*0.45*2 = 1.8 per sequence
    assert float(_balance_loss(seq, peaked, ids, 2)) == pytest.approx(1.8)
    # batch-wise: P over all 4 tokens = [0.25]*4, f = [1]*4 -> 1.0: the batch is balanced
    assert float(_balance_loss(bat, peaked, ids, 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="aux_kind"):
        dsv3lab.train.train(CFG, torch.arange(500) % 500, None,
                            TrainConfig(steps=1, aux_kind="token", seq_len=8, batch_size=1), progress=False)


def test_balancing_arms_change_only_balancing():
    from dsv3lab.experiments.balancing import ARMS, arm_settings, config, freeze_step, parse_arm
    cfg = config(False)
    arms = ARMS(cfg)
    assert arms[-1] == "none" and len(arms) == len(set(arms)) == len(cfg["gammas"]) + len(cfg["seq_alphas"]) + \
        len(cfg["batch_alphas"]) + 1
    assert all("." not in a for a in arms)            # arm names go into "<arm>.<metric>" keys
    got = {a: arm_settings(cfg, a) for a in arms}
    steps = cfg["train"]["steps"]
    assert got["aux_free_g1e-3"] == dict(bias_gamma=0.001, bias_freeze_step=freeze_step(steps), aux_alpha=0.0)
    assert got["seq_aux_a1e-2"] == dict(bias_gamma=0.0, aux_alpha=0.01, aux_kind="sequence")
    assert got["batch_aux_a1e-1"] == dict(bias_gamma=0.0, aux_alpha=0.1, aux_kind="batch")
    assert got["none"] == dict(bias_gamma=0.0, aux_alpha=0.0)
    assert parse_arm("aux_free_g3e-4") == ("aux_free", 3e-4)
    # the report's schedule: gamma for 14.3T of 14.8T tokens, then 0
    assert freeze_step(400) == round(400 * 14.3 / 14.8) == 386 and freeze_step(1) == 0
    for bad in ("magic", "aux_free_gx", "seq_aux_1e-2", "none_a1"):
        with pytest.raises(ValueError, match="unknown balancing arm"):
            arm_settings(cfg, bad)


def _fake_balancing(metrics, arms):
    return dict(name="balancing", arms=arms, seeds=[0, 1], metrics={
        k: dict(per_seed=v, mean=sum(v) / len(v), std=0.0, min=min(v), max=max(v), n=len(v)) for k, v in metrics.items()})


def test_best_arms_by_hand():
    """The lowest mean MaxVio_global per scheme; with loss_tol, only among settings whose paired
    val-loss cost against none is at most loss_tol."""
    from dsv3lab.experiments.balancing import best_arms, sweep_rows
    arms = ["aux_free_g1e-3", "aux_free_g1e-2", "seq_aux_a1e-3", "seq_aux_a1e-1", "none"]
    m = {"none.val_loss": [3.00, 3.10], "none.maxvio_global": [5.0, 5.0],
         "aux_free_g1e-3.val_loss": [3.00, 3.10], "aux_free_g1e-3.maxvio_global": [0.5, 0.7],
         "aux_free_g1e-2.val_loss": [3.01, 3.11], "aux_free_g1e-2.maxvio_global": [0.2, 0.2],
         "seq_aux_a1e-3.val_loss": [3.00, 3.10], "seq_aux_a1e-3.maxvio_global": [1.0, 1.2],
         "seq_aux_a1e-1.val_loss": [3.05, 3.15], "seq_aux_a1e-1.maxvio_global": [0.1, 0.1]}
    for k in list(m):
        if k.endswith("val_loss"):
            m[k.replace("val_loss", "maxvio_batch")] = [1.0, 1.0]
            m[k.replace("val_loss", "train_maxvio_drift")] = [0.0, 0.0]
    res = _fake_balancing(m, arms)
    assert best_arms(res) == {"aux_free": "aux_free_g1e-2", "seq_aux": "seq_aux_a1e-1", "none": "none"}
    # the most balanced aux loss costs 0.05 nats/token: excluded under a 0.02 tolerance
    assert best_arms(res, loss_tol=0.02) == {"aux_free": "aux_free_g1e-2", "seq_aux": "seq_aux_a1e-3", "none": "none"}
    assert best_arms(res, loss_tol=-1.0)["aux_free"] == "aux_free_g1e-2"     # nothing qualifies: all kept
    rows = {(r["scheme"], r["gamma / alpha"]): r for r in sweep_rows(res)}
    assert rows[("seq_aux", 0.1)]["loss cost vs none"] == pytest.approx(0.05) and rows[("seq_aux", 0.1)]["best"]
    assert not rows[("aux_free", 0.001)]["best"] and rows[("aux_free", 0.01)]["MaxVio_global"] == pytest.approx(0.2)


def test_uniform_floor():
    from dsv3lab.experiments.balancing import uniform_floor
    assert uniform_floor(100, 8, 8, draws=5) == 0.0            # every token on every expert
    small, big = uniform_floor(512, 64, 6), uniform_floor(28_000, 64, 6, draws=50)
    # sampling noise of n Bernoulli(k/E) counts: about 2.4 standard deviations over the mean for
    # the largest of 64 experts, sqrt((1 - k/E) / (n k / E)) each
    for n, got in ((512, small), (28_000, big)):
        sd = math.sqrt((1 - 6 / 64) / (n * 6 / 64))
        assert 1.8 * sd < got < 3.0 * sd, (n, got, sd)


def test_bias_freezes_at_freeze_step():
    """gamma = 0 from bias_freeze_step on: with lr 0, three steps frozen after the first leave
    the biases at the first step's update, and a run without the freeze keeps moving them."""
    tokens = torch.randint(2, CFG.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    seen = []
    tc = TrainConfig(steps=3, batch_size=2, seq_len=32, lr=0.0, warmup_steps=1, bias_gamma=0.02, threads=1,
                     bias_freeze_step=1)
    model = dsv3lab.build(CFG, seed=0)
    dsv3lab.train.train(CFG, tokens, None, tc, model=model, progress=False,
                        on_step=lambda s, row, counts: seen.append([c.clone().float() for c in counts]))
    for g, c in zip(dsv3lab.train.moe_gates(model), seen[0]):
        torch.testing.assert_close(g.e_score_correction_bias, -0.02 * torch.sign(c - c.mean()))
    free = dsv3lab.build(CFG, seed=0)
    dsv3lab.train.train(CFG, tokens, None, dataclasses.replace(tc, bias_freeze_step=None), model=free, progress=False)
    assert any(not torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)
               for a, b in zip(dsv3lab.train.moe_gates(model), dsv3lab.train.moe_gates(free)))


def test_bias_update_sign_in_training():
    """After one step with lr 0, each bias is -gamma * sign(load - mean load) of that step's
    routing (the counts the recorder saw), and no other parameter moved."""
    model = dsv3lab.build(CFG, seed=0)
    tokens = torch.randint(2, CFG.vocab_size, (3000,), generator=torch.Generator().manual_seed(0))
    seen = []
    tc = TrainConfig(steps=1, batch_size=2, seq_len=32, lr=0.0, warmup_steps=1, bias_gamma=0.02, threads=1)
    dsv3lab.train.train(CFG, tokens, None, tc, model=model, progress=False,
                        on_step=lambda s, row, counts: seen.append([c.clone() for c in counts]))
    gates = dsv3lab.train.moe_gates(model)
    assert len(seen) == 1 and len(seen[0]) == len(gates)
    for g, c in zip(gates, seen[0]):
        c = c.float()
        want = -0.02 * torch.sign(c - c.mean())
        torch.testing.assert_close(g.e_score_correction_bias, want)


# ------------------------------------------------------------------------------ the registry

def test_spread_by_hand():
    s = X.spread([1.0, 2.0, 4.0])
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert (s["min"], s["max"], s["n"], s["per_seed"]) == (1.0, 4.0, 3, [1.0, 2.0, 4.0])
    assert X.spread([5.0])["std"] == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        X.spread([1.0, float("nan")])


def test_run_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown experiment"):
        X.run("nope")
    with pytest.raises(ValueError, match="no config field"):
        X.run("balancing", quick=True, stepz=3)
    with pytest.raises(ValueError, match="repeated seeds"):
        X.run("balancing", quick=True, seeds=(0, 0))


def test_load_result_missing_and_corrupt(tmp_path):
    assert X.load_result("balancing", out_dir=str(tmp_path)) is None
    (tmp_path / "balancing.json").write_text("{not json")
    with pytest.raises(ValueError, match="balancing.json"):
        X.load_result("balancing", out_dir=str(tmp_path))
    (tmp_path / "balancing.json").write_text(json.dumps({"name": "balancing"}))
    with pytest.raises(ValueError, match="no 'config' field"):
        X.load_result("balancing", out_dir=str(tmp_path))


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    res = {n: X.run(n, quick=True, seeds=(0, 1, 2), record=True, out_dir=str(out), progress=False)
           for n in ("balancing", "mtp", "fp8_training")}
    return out, res


@pytest.mark.parametrize("name", ["balancing", "mtp", "fp8_training"])
def test_quick_run_has_the_schema(quick_results, name):
    out, results = quick_results
    res = results[name]
    assert X.load_result(name, out_dir=str(out)) == json.loads(json.dumps(res))
    for key in ("name", "title", "paper", "arms", "config", "scale", "quick", "seeds", "command", "commit",
                "dirty", "created", "wall_s", "metrics", "series"):
        assert key in res, key
    assert res["seeds"] == [0, 1, 2] and res["quick"] is True
    assert res["command"] == f"python -m dsv3lab experiment {name} --quick"
    assert res["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", res["commit"])
    for arm in res["arms"]:
        assert f"{arm}.val_loss" in res["metrics"], arm
    for key, m in res["metrics"].items():
        assert len(m["per_seed"]) == 3, key
        assert m["mean"] == pytest.approx(sum(m["per_seed"]) / 3), key
        assert m["min"] <= m["mean"] <= m["max"]
    figs = X.figures(name, res)
    assert figs and all(hasattr(f, "savefig") for f in figs.values())


def test_quick_runs_share_seeds_across_arms(quick_results):
    """Same seed -> same initial weights and windows in every arm: the first step's loss is
    identical across balancing arms and across the MTP arms (the main model's init does not
    depend on whether an MTP layer is built after it); different seeds differ."""
    _, res = quick_results
    # balancing stores 5-step means (the bias moves after step 0), so its first step is re-run here
    from dsv3lab.experiments import balancing as B
    from dsv3lab.experiments.training import model_config, token_streams, train_config
    cfg = {**res["balancing"]["config"], "train": {**res["balancing"]["config"]["train"], "steps": 1}}
    _, train_ids, _ = token_streams(CFG.vocab_size, cfg["docstrings"], cfg["max_docs"])
    first = {a: [dsv3lab.train.train(model_config(cfg), train_ids, None, train_config(cfg, s, **B.arm_settings(cfg, a)),
                                     progress=False)[1][0]["loss"] for s in res["balancing"]["seeds"]]
             for a in res["balancing"]["arms"]}
    assert all(v == first["none"] for v in first.values())
    assert len(set(first["none"])) == 3
    mtp = res["mtp"]["series"]
    assert [c[0] for c in mtp["mtp.loss"]["per_seed"]] == [c[0] for c in mtp["no_mtp.loss"]["per_seed"]]


def test_quick_derived_metrics_by_hand(quick_results):
    _, res = quick_results
    m = res["fp8_training"]["metrics"]
    for i in range(3):
        fp8, bf16 = m["fp8.val_loss"]["per_seed"][i], m["bf16.val_loss"]["per_seed"][i]
        assert m["fp8.rel_val_loss_err_vs_bf16"]["per_seed"][i] == pytest.approx(abs(fp8 - bf16) / bf16)
    m = res["mtp"]["metrics"]
    for i in range(3):
        assert m["val_loss_delta"]["per_seed"][i] == pytest.approx(
            m["mtp.val_loss"]["per_seed"][i] - m["no_mtp.val_loss"]["per_seed"][i])
    assert 0 <= m["mtp.acceptance_rate"]["mean"] <= 1
    assert 1 <= m["mtp.tokens_per_step"]["mean"] <= 2
    bal = res["balancing"]["metrics"]
    from dsv3lab.experiments.training import model_config
    mc = model_config(res["balancing"]["config"])
    assert (mc.n_routed_experts, mc.num_experts_per_tok) == (64, 6)          # LFB's expert count
    # at most the ceiling E/k - 1 (every token on the same k experts; fp32, hence the 1e-5)
    assert all(0 <= bal[f"{a}.maxvio_global"]["mean"] <= mc.n_routed_experts / mc.num_experts_per_tok - 1 + 1e-5
               for a in res["balancing"]["arms"])


def test_experiment_command(capsys):
    from dsv3lab.cli import build_parser, main
    args = build_parser().parse_args(["experiment", "balancing", "--quick", "--seeds", "0,1,2"])
    assert args.name == "balancing" and args.quick and args.seeds == "0,1,2"
    assert main(["experiment", "list"]) == 0
    out = capsys.readouterr().out
    assert "balancing" in out and "fp8_training" in out and "mtp" in out
    assert main(["experiment", "balancing", "--quick", "--seeds", "a,b"]) == 2


def test_run_a_subset_of_arms_with_overrides(tmp_path):
    res = X.run("fp8_training", quick=True, seeds=(0,), arms=("bf16", "fp8"), progress=False,
                train=dict(steps=2), out_dir=str(tmp_path))
    assert res["arms"] == ["bf16", "fp8"] and res["config"]["train"]["steps"] == 2
    assert res["config"]["train"]["batch_size"] == X.module("fp8_training").config(True)["train"]["batch_size"]
    assert not any(k.startswith("fp32.") or "rel_" in k for k in res["metrics"])   # derive needs all arms
    assert "'arms': ['bf16', 'fp8']" in res["command"] and "'steps': 2" in res["command"]
    assert list(tmp_path.iterdir()) == []                       # quick runs are not recorded
    with pytest.raises(ValueError, match="no arm"):
        X.run("fp8_training", quick=True, arms=("fp16",))


def test_bias_sim_balances_better_with_larger_batches():
    """The router-only simulation: the bias update evens a skewed router out, and counting on
    larger batches (less sampling noise in the sign) leaves less imbalance; uniform routing on
    the same tokens is the floor under both."""
    from dsv3lab.balance.bias_sim import best_per_batch, simulate
    small = simulate(64, 3e-3, steps=150, n_experts=16, top_k=2, eval_tokens=8192, seed=0)
    large = simulate(4096, 3e-3, steps=150, n_experts=16, top_k=2, eval_tokens=8192, seed=0)
    assert small["maxvio_zero_bias"] > 2.0                          # the router is skewed
    assert small["floor"] < large["maxvio_global"] < small["maxvio_global"] < 0.5 * small["maxvio_zero_bias"]
    rows = [dict(batch_tokens=64, gamma=1e-3, maxvio_global=0.3), dict(batch_tokens=64, gamma=1e-2, maxvio_global=0.2)]
    assert best_per_batch(rows)[64]["gamma"] == 1e-2


def test_an_experiment_that_cannot_be_imported_is_listed_with_why(monkeypatch, capsys):
    """A registered experiment whose module is missing stays in ``names()`` and in ``dsv3lab
    experiment list`` as unavailable, naming the missing module; running it is a clear error."""
    from dsv3lab.cli import main
    monkeypatch.setitem(X.REGISTRY, "ghost", "dsv3lab.experiments._no_such_experiment")
    assert "ghost" in X.names() and X.names()[:4] == ["balancing", "mtp", "fp8_training", "pipeline"]
    assert X.unavailable() == {"ghost": "missing module dsv3lab.experiments._no_such_experiment"}
    with pytest.raises(X.ExperimentUnavailable, match="missing module 'dsv3lab.experiments._no_such_experiment'"):
        X.module("ghost")
    assert main(["experiment", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("ghost") and "unavailable: missing module dsv3lab.experiments._no_such_experiment" in ln
               for ln in lines)
    assert len(lines) == len(X.REGISTRY)
    assert main(["experiment", "ghost", "--quick", "--no-progress"]) == 2
    assert "missing module" in capsys.readouterr().err


def test_an_experiment_whose_dependency_is_missing_names_the_dependency(tmp_path, monkeypatch):
    (tmp_path / "lab_exp_needing_more.py").write_text("import no_such_dependency_for_dsv3lab\nNAME = 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(X.REGISTRY, "needs_more", "lab_exp_needing_more")
    assert "needs_more" in X.names()
    assert X.unavailable() == {"needs_more": "missing module no_such_dependency_for_dsv3lab"}
    with pytest.raises(X.ExperimentUnavailable, match="'needs_more'.*missing module 'no_such_dependency_for_dsv3lab'"):
        X.module("needs_more")
