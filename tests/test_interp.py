"""dsv3lab.interp against independent references: the logit lens against a hand-written norm +
head, replay after perturbed biases, reroute/zero ablation against a token-by-token router written
here, patching identities, attributions summing to the logit (and one expert's share recomputed by
calling the expert), specialisation statistics against a hand-computed case."""

import math

import pytest
import torch

import dsv3lab
from dsv3lab import interp as I
from dsv3lab.model import layers as model_layers
from dsv3lab.probes import hooks, run_with_cache, trace

POLICIES = ["native", "upcast"]


def _model(dtype=torch.float32, seed=0):
    m = dsv3lab.build("tiny", seed=seed, dtype=dtype).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():   # non-zero biases of both signs: selection uses s + b, weights use s
        for blk in list(m.layers) + list(m.mtp):
            if hasattr(blk.mlp, "gate"):
                blk.mlp.gate.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.05)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(params=["fp32", "bf16-native", "bf16-upcast"])
def any_model(request, monkeypatch):
    if request.param == "fp32":
        return _model()
    monkeypatch.setattr(model_layers, "_NATIVE_BF16", request.param.endswith("native"))
    return _model(torch.bfloat16)


def _tokens(B=2, S=10, seed=0):
    return torch.randint(2, 512, (B, S), generator=torch.Generator().manual_seed(seed))


def _rms_head(model, h):
    """Independent final norm + head: h / sqrt(mean h^2 + eps) * g, then W_U, in fp32."""
    h = h.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + model.norm.eps) * model.norm.weight.float()
    return y @ model.lm_head.weight.float().T


# ---------------------------------------------------------------------------------------------
# hook_expert_out and the fast path
# ---------------------------------------------------------------------------------------------

def test_observing_expert_out_changes_nothing(model):
    tok = _tokens()
    base = model(tok)
    seen = []
    with hooks(model, [("layers.*.mlp.hook_expert_out", lambda t, n: seen.append(t.shape))]):
        hooked = model(tok)
    # the hooked path multiplies the same fp32 products and sums them in the same order
    assert torch.equal(base, hooked)
    assert seen and all(s == (tok.numel(), 4, 64) for s in seen)


def test_expert_out_is_each_experts_own_output(model):
    tok = _tokens(1, 6)
    L = 1
    _, c = run_with_cache(model, tok, [f"layers.{L}.hook_resid_mid", f"layers.{L}.mlp.gate.hook_topk_ids",
                                       f"layers.{L}.mlp.hook_expert_out"])
    blk = model.layers[L]
    x = blk.post_attention_layernorm(c[f"layers.{L}.hook_resid_mid"]).reshape(-1, 64)
    ids, outs = c[f"layers.{L}.mlp.gate.hook_topk_ids"], c[f"layers.{L}.mlp.hook_expert_out"]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            ref = blk.mlp.experts[int(ids[t, j])](x[t:t + 1])[0]
            torch.testing.assert_close(outs[t, j], ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# logit lens
# ---------------------------------------------------------------------------------------------

@pytest.mark.numerics
def test_lens_last_row_is_the_models_logits(any_model):
    tok = _tokens()
    lens = dsv3lab.logit_lens(any_model, tok)
    assert lens.shape == (len(any_model.layers), 2, 10, any_model.cfg.vocab_size)
    # the last row is the forward's own head on the same hidden state: the same computation
    assert torch.equal(lens[-1], any_model(tok))


def test_lens_rows_against_hand_written_norm_and_head(model):
    tok = _tokens()
    lens = I.logit_lens(model, tok)
    _, cache = run_with_cache(model, tok, "layers.*.hook_resid_post")
    for L in range(len(model.layers)):
        torch.testing.assert_close(lens[L], _rms_head(model, cache[f"layers.{L}.hook_resid_post"]),
                                   rtol=1e-4, atol=1e-5)


def test_lens_mtp_row_is_target_aligned(model):
    tok = _tokens()
    lens = I.logit_lens(model, tok, mtp=True)
    n = len(model.layers)
    assert lens.shape[0] == n + 1
    with torch.no_grad():
        _, h = model(tok, return_hidden=True)
        mtp = model.mtp_logits(h[:, :-1], tok[:, 1:])[0]             # position i predicts t_{i+2}
    assert torch.isnan(lens[n, :, 0]).all()
    torch.testing.assert_close(lens[n, :, 1:], mtp, rtol=0, atol=0)
    st = I.next_token_stats(lens, tok)
    assert torch.isnan(st["prob"][n, :, 0]).all() and not torch.isnan(st["prob"][n, :, 1:]).any()
    # the reference row for the KL is the model's own last block: zero there
    torch.testing.assert_close(st["kl_to_final"][n - 1], torch.zeros(2, 9), rtol=0, atol=1e-5)
    p = torch.softmax(lens[n - 1, :, :-1].float(), -1).gather(-1, tok[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(st["prob"][n - 1], p)


def test_affine_lens_is_the_least_squares_map(model):
    w = _tokens(8, 24, seed=7)             # 192 tokens > D + 1 unknowns: a unique solution
    tr = I.fit_affine_lens(model, w, ridge=0.0)
    _, cache = run_with_cache(model, w, ["layers.0.hook_resid_post", "layers.2.hook_resid_post"])
    x = cache["layers.0.hook_resid_post"].reshape(-1, 64).double()
    y = cache["layers.2.hook_resid_post"].reshape(-1, 64).double()
    sol = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y).solution
    torch.testing.assert_close(tr[0][0], sol[:-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(tr[0][1], sol[-1], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(tr[2][0], torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-8)
    ident = [(torch.eye(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64))] * 3
    torch.testing.assert_close(I.logit_lens(model, w, translators=ident), I.logit_lens(model, w), rtol=1e-6, atol=1e-6)
    kl = I.lens_kl(model, w)
    assert kl.shape == (3,) and float(kl[-1]) == pytest.approx(0.0, abs=1e-6) and (kl >= -1e-6).all()
    with pytest.raises(ValueError, match="translators"):
        I.logit_lens(model, w, translators=ident[:2])


# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------

@pytest.mark.numerics
def test_replay_restores_logits_after_bias_perturbation(any_model):
    m, tok = any_model, _tokens()
    with trace(m) as t:
        base = m(tok)
    with I.perturbed_biases(m, scale=0.5, seed=1):
        with trace(m) as t2:
            moved = m(tok)
        assert not torch.equal(t2.routing.topk_ids, t.routing.topk_ids)
        assert (moved.float() - base.float()).abs().max() > 1e-3
        with dsv3lab.replay(m, t.routing) as r:
            again = m(tok)
        assert r.exhausted
        # same experts with the same recorded weights: the traced computation, bit for bit
        assert torch.equal(again, base)
        with dsv3lab.replay(m, t.routing, recompute_weights=True):
            recomputed = m(tok)     # the bias never enters the weights: the same weights again
        torch.testing.assert_close(recomputed.float(), base.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(m(tok), base)      # biases restored, seams cleared
    assert all(blk.mlp.gate.forced_routing is None for blk in m.layers if hasattr(blk.mlp, "gate"))


def test_replay_generation(model):
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with trace(model) as t:
        ref = model.generate(prompts, max_new_tokens=5, stop_tokens=[])
    with I.perturbed_biases(model, scale=1.0, seed=2):
        with I.replay(model, t.routing) as r:
            got = model.generate(prompts, max_new_tokens=5, stop_tokens=[])
    assert got == ref and r.exhausted


def test_replay_refuses_other_tokens_and_running_out(model):
    tok = _tokens()
    with trace(model) as t:
        model(tok)
    with pytest.raises(I.ReplayError, match="token"):
        with I.replay(model, t.routing):
            model(_tokens(seed=5))
    with pytest.raises(I.ReplayError, match="needs recorded rows"):
        with I.replay(model, t.routing):
            model(tok)
            model(tok)
    assert all(blk.mlp.gate.forced_routing is None for blk in model.layers if hasattr(blk.mlp, "gate"))


def test_replay_from_vllm_and_sglang_layouts(model):
    tok = _tokens(1, 9)
    with trace(model, mtp=False) as t:
        base = model(tok)
    rec = t.record()
    v = I.to_vllm(rec, prompt_len=6)
    assert v["prompt_routed_experts"].shape == (6, 2, 4) and v["routed_experts"].dtype.name == "int16"
    back = I.from_vllm(v["prompt_routed_experts"], v["routed_experts"], model, token_ids=tok[0])
    assert torch.equal(back["tensors"]["topk_ids"], rec["tensors"]["topk_ids"])
    with pytest.raises(ValueError, match="recompute_weights"):
        I.replay(model, back)
    with I.perturbed_biases(model, scale=0.5, seed=3):
        with I.replay(model, back, recompute_weights=True):
            got = model(tok)
    torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)
    b64 = I.to_sglang_routed(rec)
    sg = I.from_sglang_routed(b64, model)
    assert torch.equal(sg["tensors"]["topk_ids"], rec["tensors"]["topk_ids"])
    # a dump over every block (dense rows included) picks out the MoE layers
    full = torch.zeros(9, 3, 4, dtype=torch.int64)
    full[:, 1:] = rec["tensors"]["topk_ids"].permute(1, 0, 2)
    assert torch.equal(I.from_per_token(full, model)["tensors"]["topk_ids"], rec["tensors"]["topk_ids"])
    with pytest.raises(ValueError, match="expert ids"):
        I.from_per_token(full + 100, model)


# ---------------------------------------------------------------------------------------------
# ablation
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _reference_route(model, layer, x, removed):
    """Token-by-token group-limited router with ``removed`` experts gone (written for this test)."""
    cfg, gate = model.cfg, model.layers[layer].mlp.gate
    E, G, k, kg = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok, cfg.topk_group
    per = E // G
    out = []
    for t in range(x.shape[0]):
        s = [1 / (1 + math.exp(-float(x[t].double() @ gate.weight[e].double()))) for e in range(E)]
        sel = {e: s[e] + float(gate.e_score_correction_bias[e]) for e in range(E) if e not in removed}
        gscore = {}
        for g in range(G):
            vals = sorted((sel[e] for e in range(g * per, (g + 1) * per) if e in sel), reverse=True)
            if vals:
                gscore[g] = sum(vals[:2])
        kept = sorted(gscore, key=lambda g: -gscore[g])[:kg]
        cand = [e for e in sel if e // per in kept]
        ids = sorted(cand, key=lambda e: -sel[e])[:k]
        w = [s[e] for e in ids]
        out.append({e: wi / sum(w) * cfg.routed_scaling_factor for e, wi in zip(ids, w)})
    return out


def test_reroute_never_selects_ablated_and_matches_reference_router(model):
    tok = _tokens(2, 12)
    removed = {1: [0, 1, 2, 3, 9], 2: [4, 5]}     # layer 1 loses all of group 0
    with dsv3lab.ablate_experts(model, removed, mode="reroute"):
        logits, c = run_with_cache(model, tok, ["layers.*.hook_resid_mid", "layers.*.mlp.gate.hook_topk_*"])
    for L, gone in removed.items():
        ids = c[f"layers.{L}.mlp.gate.hook_topk_ids"]
        assert not torch.isin(ids, torch.tensor(gone)).any()
        x = model.layers[L].post_attention_layernorm(c[f"layers.{L}.hook_resid_mid"]).reshape(-1, 64)
        ref = _reference_route(model, L, x, set(gone))
        w = c[f"layers.{L}.mlp.gate.hook_topk_weights"]
        for t in range(ids.shape[0]):
            got = {int(e): float(v) for e, v in zip(ids[t], w[t])}
            assert set(got) == set(ref[t])
            for e in got:
                assert got[e] == pytest.approx(ref[t][e], rel=1e-5)
    assert all(blk.mlp.gate.expert_mask is None for blk in model.layers if hasattr(blk.mlp, "gate"))


def test_zero_ablation_keeps_routing_and_drops_outputs(model):
    tok = _tokens(2, 12)
    L = 1
    names = [f"layers.{L}.hook_resid_mid", f"layers.{L}.mlp.gate.hook_topk_ids",
             f"layers.{L}.mlp.gate.hook_topk_weights", f"layers.{L}.hook_mlp_out"]
    _, base = run_with_cache(model, tok, names)
    ids = base[f"layers.{L}.mlp.gate.hook_topk_ids"]
    gone = [int(e) for e in torch.bincount(ids.flatten(), minlength=16).argsort(descending=True)[:3]]
    with dsv3lab.ablate_experts(model, {L: gone}, mode="zero"):
        _, abl = run_with_cache(model, tok, names)
    assert torch.equal(abl[names[1]], ids) and torch.equal(abl[names[2]], base[names[2]])
    blk = model.layers[L]
    x = blk.post_attention_layernorm(base[names[0]]).reshape(-1, 64)
    w = base[names[2]]
    for t in range(x.shape[0]):
        ref = blk.mlp.shared_experts(x[t:t + 1])[0].clone()
        for j in range(4):
            if int(ids[t, j]) not in gone:
                ref += w[t, j] * blk.mlp.experts[int(ids[t, j])](x[t:t + 1])[0]
        torch.testing.assert_close(abl[names[3]].reshape(-1, 64)[t], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(abl[names[3]], base[names[3]])


def test_ablation_bad_input(model):
    with pytest.raises(ValueError, match="dense block"):
        with I.ablate_experts(model, {0: [1]}):
            pass
    with pytest.raises(ValueError, match="outside"):
        with I.ablate_experts(model, {1: [16]}):
            pass
    with pytest.raises(ValueError, match="fewer than top_k"):      # 16 experts, 4 groups, keep 2, top-4
        with I.ablate_experts(model, {1: list(range(13))}):
            pass
    with pytest.raises(ValueError, match="mode"):
        with I.ablate_experts(model, {1: [1]}, mode="drop"):
            pass
    assert model.layers[1].mlp.gate.expert_mask is None


def test_expert_importance_matches_full_forwards(model):
    w = _tokens(3, 17, seed=4)
    imp = I.expert_importance(model, w, mode="reroute", progress=False)
    assert imp["delta"].shape == (2, 16) and len(imp["rows"]) == 32
    torch.testing.assert_close(imp["load"].sum(-1), torch.ones(2, dtype=torch.float64).float(), rtol=0, atol=1e-6)
    base = I.next_token_loss(model, w)
    assert imp["base"] == pytest.approx(base, rel=1e-6)
    zero = I.expert_importance(model, w, mode="zero", experts_per_batch=5, progress=False)
    for L, e in [(1, 3), (2, 11), (2, 15)]:      # batched copies == one full forward per ablation
        for mode, got in (("reroute", imp), ("zero", zero)):
            with I.ablate_experts(model, {L: [e]}, mode=mode):
                full = I.next_token_loss(model, w)
            assert got["delta"][[1, 2].index(L), e] == pytest.approx(full - base, abs=1e-5)
    assert (imp["delta"] != 0).any() and (zero["delta"] != 0).any()


# ---------------------------------------------------------------------------------------------
# patching
# ---------------------------------------------------------------------------------------------

@pytest.mark.numerics
def test_patching_whole_last_residual_recovers_clean_logits(any_model):
    m = any_model
    clean, corrupt = _tokens(1, 10, seed=1), _tokens(1, 10, seed=2)
    name = f"layers.{len(m.layers) - 1}.hook_resid_post"
    clean_logits, cache = run_with_cache(m, clean, name)
    got = I.patched_run(m, corrupt, cache, [name])
    assert torch.equal(got, clean_logits)


def test_patching_identities_per_position(model):
    clean, corrupt = _tokens(1, 10, seed=1), _tokens(1, 10, seed=2)
    with torch.no_grad():
        lg = model(clean)[0, -1]
    answer, wrong = int(lg.argmax()), int(lg.argmin())
    res = I.activation_patching(model, clean, corrupt, I.logit_diff(answer, wrong), hook="resid_post")
    last = len(model.layers) - 1
    # the last block's residual at the last position is all the last logits read: 1 exactly there,
    # 0 at every other position of that block
    assert res.scores[last, -1] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(res.scores[last, :-1], torch.zeros(9), rtol=0, atol=1e-5)
    # resid_pre at the first block and the last position == swapping the last token only
    res0 = I.activation_patching(model, clean, corrupt, I.logit_diff(answer, wrong), hook="resid_pre", layers=[0])
    swapped = corrupt.clone()
    swapped[0, -1] = clean[0, -1]
    m = I.logit_diff(answer, wrong)
    with torch.no_grad():
        want = (float(m(model(swapped))[0]) - res0.corrupt) / (res0.clean - res0.corrupt)
    assert float(res0.scores[0, -1]) == pytest.approx(want, abs=1e-4)
    for hook in ("kv_latent", "routed_out", "shared_out", "attn_out", "mlp_out"):
        r = I.activation_patching(model, clean, corrupt, m, hook=hook)
        assert r.scores.shape == (len(r.rows), 10) and torch.isfinite(r.scores).all()
    assert I.activation_patching(model, clean, corrupt, m, hook="routed_out").rows == [1, 2]
    with pytest.raises(ValueError, match="position axis"):
        I.activation_patching(model, clean, corrupt, m, hook="layers.{L}.mlp.hook_expert_counts", layers=[1])
    with pytest.raises(ValueError, match="nothing to recover"):
        I.activation_patching(model, clean, clean, m)


def test_expert_patching_against_direct_expert_calls(model):
    clean, corrupt = _tokens(1, 8, seed=1), _tokens(1, 8, seed=2)
    with torch.no_grad():
        lg = model(clean)[0, -1]
    metric = I.logit_diff(int(lg.argmax()), int(lg.argmin()))
    res = I.expert_patching(model, clean, corrupt, metric)
    assert res.scores.shape == (2, 16)
    L = 2
    names = [f"layers.{L}.hook_resid_mid", f"layers.{L}.mlp.gate.hook_topk_ids",
             f"layers.{L}.mlp.gate.hook_topk_weights"]
    _, cc = run_with_cache(model, clean, names)
    _, rc = run_with_cache(model, corrupt, names)
    blk = model.layers[L]

    def contribution(c, e):
        x = blk.post_attention_layernorm(c[names[0]]).reshape(-1, 64)
        hit = (c[names[1]] == e).float() * c[names[2]]
        return hit.sum(-1, keepdim=True) * blk.mlp.experts[e](x)

    used = torch.cat([cc[names[1]].flatten(), rc[names[1]].flatten()])
    for e in range(16):
        if not (used == e).any():      # routed nowhere in either run: patching it changes nothing
            assert float(res.scores[1, e]) == pytest.approx(0.0, abs=1e-5)   # batch-size rounding only
    e = int(torch.bincount(used, minlength=16).argmax())
    delta = (contribution(cc, e) - contribution(rc, e)).detach()
    with torch.no_grad(), hooks(model, [(f"layers.{L}.mlp.hook_routed_out", lambda t, n: t + delta)]):
        want = float(metric(model(corrupt))[0])
    assert float(res.raw[1, e]) == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# direct logit attribution
# ---------------------------------------------------------------------------------------------

@pytest.mark.numerics
def test_attributions_sum_to_the_logit(any_model):
    m, tok = any_model, _tokens()
    att = I.direct_logit_attribution(m, tok)
    if m.dtype == torch.float32:
        torch.testing.assert_close(att.total(), att.logit, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att.total(), att.linearised, rtol=1e-5, atol=1e-5)
    else:
        # the model rounds its bf16 residual stream after each addition: the components miss the
        # final hidden state by those roundings only (bf16 eps 2^-8, a few dozen additions)
        assert (att.rounding.abs() <= 2 ** -5 * att.magnitude()).all()
        assert (att.linearised - att.logit).abs().max() <= 2 ** -5 * att.logit.abs().max() + 1e-2
    # the routed experts appear only where chosen: k of them per token per MoE layer (or fewer if 0)
    assert int((att.experts[1] != 0).sum((0,))[0, 0]) <= 4


def test_one_experts_attribution_by_hand(model):
    tok = _tokens(1, 7)
    target = 17
    att = I.direct_logit_attribution(model, tok, targets=target)
    L = 1
    names = [f"layers.{L}.hook_resid_mid", f"layers.{L}.mlp.gate.hook_topk_ids",
             f"layers.{L}.mlp.gate.hook_topk_weights", "hook_final"]
    _, c = run_with_cache(model, tok, names)
    blk = model.layers[L]
    x = blk.post_attention_layernorm(c[names[0]]).reshape(-1, 64)
    h = c["hook_final"].reshape(-1, 64)
    s = 3
    scale = 1 / torch.sqrt(h[s].pow(2).mean() + model.norm.eps)
    u = model.lm_head.weight[target] * model.norm.weight
    for j in range(4):
        e = int(c[names[1]][s, j])
        with torch.no_grad():
            ref = float((c[names[2]][s, j] * blk.mlp.experts[e](x[s:s + 1])[0] * u).sum() * scale)
        assert float(att.experts[L, e, 0, s]) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    rows = att.table(0, s, top=None)
    assert sum(r["value"] for r in rows) == pytest.approx(float(att.logit[0, s]), rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# specialisation
# ---------------------------------------------------------------------------------------------

def _jsd2(p, q):
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a, b: sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_specialisation_hand_computed():
    ids = torch.tensor([[[0, 1], [0, 1], [2, 0], [2, 1]],
                        [[1, 2], [0, 2], [1, 0], [2, 1]]])         # [L=2, N=4, k=2], E=3
    labels = ["a", "a", "b", "b"]
    sp = I.expert_specialisation(ids, labels, 3)
    assert sp.classes == ["a", "b"]
    torch.testing.assert_close(sp.counts[0], torch.tensor([[2., 2., 0.], [1., 1., 2.]], dtype=torch.float64))
    torch.testing.assert_close(sp.p_expert_given_class[0],
                               torch.tensor([[.5, .5, 0], [.25, .25, .5]], dtype=torch.float64))
    torch.testing.assert_close(sp.p_expert[0], torch.tensor([3 / 8, 3 / 8, 2 / 8], dtype=torch.float64))
    assert float(sp.jsd_expert[0, 0]) == pytest.approx(_jsd2([2 / 3, 1 / 3], [.5, .5]))
    assert float(sp.jsd_expert[0, 2]) == pytest.approx(_jsd2([0, 1], [.5, .5]))
    assert float(sp.jsd_class[0, 1]) == pytest.approx(_jsd2([.25, .25, .5], [3 / 8, 3 / 8, 2 / 8]))
    assert float(sp.lift[0, 1, 2]) == pytest.approx(2.0) and float(sp.lift[0, 0, 2]) == 0.0
    top = sp.most_selective(0, "b", n=1, min_count=1)
    assert top[0]["expert"] == 2 and top[0]["lift"] == pytest.approx(2.0)
    co = I.coactivation(ids, 3)
    ref = torch.zeros(3, 3, dtype=torch.float64)
    for t in range(4):                       # token by token: every (e in layer 0, f in layer 1) pair
        for e in ids[0, t].tolist():
            for f in ids[1, t].tolist():
                ref[e, f] += 1
    torch.testing.assert_close(co["counts"][0], ref)
    assert ref[1, 2] == 3 and ref[2, 2] == 1
    n0, n1 = torch.tensor([3., 3., 2.]), torch.tensor([2., 3., 3.])
    assert float(co["lift"][0, 1, 2]) == pytest.approx(3 * 4 / (n0[1] * n1[2]))
    with pytest.raises(ValueError, match="labels"):
        I.expert_specialisation(ids, labels[:3], 3)


def test_classify_text_code_and_prose():
    text = 'Use "x" 2 times:\n\n   for i in range(10):  # go\n       print("a")\n\n>>> y = 1.5\n'
    dom, kind = I.classify_text(text)
    at = lambda s, k=0: text.index(s) + k
    assert (dom[at("Use")], kind[at("Use")]) == ("prose", "word")
    assert (dom[at("2")], kind[at("2")]) == ("prose", "digits")
    assert kind[at(":\n")] == "punctuation" and dom[at(":\n")] == "prose"
    assert (dom[at("for")], kind[at("for")]) == ("code", "keyword")
    assert kind[at("range")] == "identifier" and kind[at("10")] == "digits"
    assert kind[at("# go")] == "comment" and kind[at('"a"')] == "string"
    assert kind[at("(10")] == "punctuation"
    assert kind[at(">>>")] == "punctuation" and kind[at("1.5")] == "digits" and dom[at("y =")] == "code"
    assert kind[at("   for")] == "whitespace"
    from dsv3lab.tokenizer import TextCodec
    tc = I.token_classes(TextCodec(None, 256), "ab 12\n   x = 1\n")
    assert tc["label"][:5] == ["prose:word", "prose:word", "prose:whitespace", "prose:digits", "prose:digits"]
    assert tc["label"][9] == "code:identifier" and tc["label"][11] == "code:punctuation"


def test_routing_by_class_runs_on_text(model):
    from dsv3lab.tokenizer import TextCodec
    texts = ["The list is sorted in place.\n\n   >>> a = [3, 1]\n   >>> a.sort()\n" * 3]
    got = I.routing_by_class(model, TextCodec(None, 512), texts, length=32, max_windows=2)
    assert got["topk_ids"].shape == (2, 64, 4) and len(got["labels"]) == 64
    sp = I.expert_specialisation(got["topk_ids"], got["labels"], 16)
    torch.testing.assert_close(sp.p_expert_given_class.sum(-1), torch.ones(2, len(sp.classes), dtype=torch.float64))
