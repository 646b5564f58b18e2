"""The V3.2 indexer's CPU decode kernels (kernels/cpu/sparse_bf16.c via dsv3lab.kernels.cpu_sparse)
against torch references written out here, and the fused decode selection that uses them
(``dsv3lab/fast/sparse.py``'s ``select_fused``) against the torch decode path it stands in for.

Float results are compared with tolerances (the kernels sum in another order); selections exactly
where no score is near the k-th one, and exactly with exact ties (integer-valued scores, which every
summation order adds exactly) to pin the tie rule: the earliest tied positions."""

import pytest
import torch
import torch.nn.functional as F

import dsv3lab
from dsv3lab.fast import sparse as fast_sparse
from dsv3lab.kernels import cpu_sparse
from dsv3lab.model.attn_sparse import set_key_format
from dsv3lab.model.indexer import Indexer, IndexerKeyCache, decode_topk, select_topk
from dsv3lab.model.rope import apply_rope_half

pytestmark = pytest.mark.skipif(not cpu_sparse.enabled(torch.zeros(1, dtype=torch.bfloat16)),
                                reason="the CPU sparse kernels are not built here (no C compiler?)")


def ref_scores(keys, q, w):
    """sum_h w[h] relu(bf16(q[h] . keys[t])): the products in fp64, rounded to bf16 like a bf16 GEMM's output."""
    logits = (keys.double() @ q.double().T).to(torch.bfloat16).double()
    return logits.clamp_min(0) @ w.double()


def score_bound(keys, q, w):
    """How far a kernel's score may be from ref_scores, per key: each logit one bf16 step (at most
    2^-7 of its size) off, where an fp32 sum in another order lands on the other side of a rounding
    tie -- rare, and never more than that step."""
    logits = (keys.double() @ q.double().T).abs()
    return 2 ** -7 * (logits @ w.double().abs()) + 1e-6


def assert_same_selection(got, scores, k, tol):
    """got is the top-k of scores, up to keys within tol of the k-th best score (near-ties)."""
    got = set(got.tolist())
    assert len(got) == k
    thr = scores.topk(k).values[-1]
    sure_in = set(torch.nonzero(scores > thr + tol).flatten().tolist())
    maybe = set(torch.nonzero(scores >= thr - tol).flatten().tolist())
    assert sure_in <= got <= maybe, (len(sure_in - got), len(got - maybe))


@pytest.mark.parametrize("T,H,k", [(300, 8, 37), (4099, 8, 2048), (1000, 64, 100), (517, 5, 1)])
def test_index_select_matches_the_torch_scores_and_topk(T, H, k):
    g = torch.Generator().manual_seed(T + H)
    logits = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w = torch.randn(H, generator=g)
    got = cpu_sparse.index_select(logits, w, k)
    ref = (logits.double().clamp_min(0) @ w.double())
    assert got.shape == (k,) and bool((got[1:] > got[:-1]).all())             # increasing positions
    assert_same_selection(got, ref, k, 1e-5 * ref.abs().max().item())
    # a strided [T,H] view (rows of a wider GEMM output) reads the same values
    wide = torch.zeros(T, H + 3, dtype=torch.bfloat16)
    wide[:, :H] = logits
    assert torch.equal(cpu_sparse.index_select(wide[:, :H], w, k), got)


def test_index_select_keeps_select_topks_tie_rule():
    g = torch.Generator().manual_seed(7)
    for trial in range(6):
        T, H = 400, 4
        # small integers (exact in bf16), power-of-two weights of both signs: every score is exact
        # in any summation order, many are equal (and many are 0 or -0.0 after the relu)
        logits = torch.randint(-3, 4, (T, H), generator=g).to(torch.bfloat16)
        w = torch.tensor([1.0, -0.5, 2.0, 0.25]) * (1 if trial % 2 else -1)
        scores = (logits.float().clamp_min(0) @ w)
        for k in (1, 7, 100, 399):
            got = cpu_sparse.index_select(logits, w, k)
            ref = select_topk(scores[None, None], k)[0, 0]
            assert got.tolist() == sorted(ref.tolist()), (trial, k)


def test_index_select_reports_nan_and_checks_its_arguments():
    logits = torch.randn(50, 8).to(torch.bfloat16)
    logits[17, 3] = float("nan")
    assert cpu_sparse.index_select(logits, torch.ones(8), 5) is None
    with pytest.raises(ValueError, match="k = 50"):
        cpu_sparse.index_select(logits, torch.ones(8), 50)
    with pytest.raises(ValueError, match="w must be 8"):
        cpu_sparse.index_select(logits, torch.ones(7), 5)
    with pytest.raises(ValueError, match="unit stride"):
        cpu_sparse.index_select(logits.T.contiguous().T, torch.ones(8), 5)


amx = pytest.mark.skipif(not cpu_sparse.amx_available(), reason="no AMX tiles on this CPU (or not granted)")


@amx
@pytest.mark.parametrize("T,H,D,k,threads", [(8193, 8, 128, 2048, 1), (1000, 64, 128, 64, 2), (77, 5, 32, 9, 2),
                                              (2048, 16, 64, 1000, 1)])
def test_index_topk_scores_the_cache_like_a_bf16_gemm(T, H, D, k, threads):
    g = torch.Generator().manual_seed(T + H + D)
    keys = torch.randn(T, D, generator=g).to(torch.bfloat16)
    q = (torch.randn(H, D, generator=g) * D ** -0.5).to(torch.bfloat16)
    w = torch.randn(H, generator=g).abs() + 0.1
    ref = ref_scores(keys, q, w)
    scores = torch.empty(T)
    n0 = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_sparse.index_topk(keys, q, w, k, scores)
    finally:
        torch.set_num_threads(n0)
    assert bool(((scores.double() - ref).abs() <= score_bound(keys, q, w)).all())
    assert (scores.double() - ref).abs().gt(1e-5 * ref.abs().max()).float().mean().item() < 0.01    # rare
    assert got.shape == (k,) and bool((got[1:] > got[:-1]).all())
    # the exact top-k of its own scores (the scores are checked above)
    assert_same_selection(got, scores.double(), k, 1e-6 * scores.abs().max().item())


@amx
def test_index_topk_reads_cache_rows_in_place_and_rejects_what_the_tiles_do_not_take():
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 600, 64, generator=g).to(torch.bfloat16)       # [B, max_len, D], 500 written
    q, w = torch.randn(8, 64, generator=g).to(torch.bfloat16), torch.rand(8, generator=g) + 0.1
    wide = torch.randn(700, 96, generator=g).to(torch.bfloat16)            # rows 96 apart, 64 read
    for keys, k in ((cache[1, :500], 50), (wide[:, 16:80], 300)):
        scores = torch.empty(keys.shape[0])
        got = cpu_sparse.index_topk(keys, q, w, k, scores)
        assert bool(((scores.double() - ref_scores(keys, q, w)).abs() <= score_bound(keys, q, w)).all())
        assert_same_selection(got, scores.double(), k, 1e-6 * scores.abs().max().item())
    nan_keys = cache[1, :500].clone()
    nan_keys[123, 5] = float("nan")
    assert cpu_sparse.index_topk(nan_keys, q, w, 50) is None               # reported, not scored as 0
    with pytest.raises(ValueError, match="D % 32"):
        cpu_sparse.index_topk(cache[1, :500, :48], q[:, :48].contiguous(), w, 50)


def test_gather_sorted_copies_the_rows():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(3000, 576, generator=g).to(torch.bfloat16)
    idx = torch.randperm(3000, generator=g)[:700].sort().values
    out = torch.empty(700, 576, dtype=torch.bfloat16)
    assert torch.equal(cpu_sparse.gather_sorted(src, idx, out), src[idx])
    with pytest.raises(ValueError, match="outside"):
        cpu_sparse.gather_sorted(src, idx + 2999, out)


def _indexer(H=8, D=64, r=32, hidden=256, qlr=96, topk=40, seed=0):
    cfg = dsv3lab.ModelConfig.preset("tiny").replace(hidden_size=hidden, q_lora_rank=qlr, qk_rope_head_dim=r,
                                                     index_n_heads=H, index_head_dim=D, index_topk=topk)
    ix = Indexer(cfg, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        ix.k_norm.weight.copy_(1 + 0.1 * torch.randn(D, generator=g))
        ix.k_norm.bias.copy_(0.1 * torch.randn(D, generator=g))
    ix.key_format = "bf16"
    return ix.eval()


def test_index_qkw_matches_the_torch_projection():
    ix = _indexer()
    H, D, r = ix.n_heads, ix.head_dim, ix.rope_dim
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, generator=g).to(torch.bfloat16)
    ql = torch.randn(96, generator=g).to(torch.bfloat16)
    ang = torch.rand(r // 2, generator=g) * 6
    cos, sin = ang.cos(), ang.sin()
    with torch.no_grad():
        # the reference in torch, every rounding where Indexer.project rounds
        qraw = F.linear(ql.double(), ix.wq_b.weight.double()).to(torch.bfloat16).view(H, D)
        kraw = F.linear(x.double(), ix.wk.weight.double()).to(torch.bfloat16)
        kn = F.layer_norm(kraw.float(), (D,), ix.k_norm.weight.float(), ix.k_norm.bias.float(), 1e-6).to(torch.bfloat16)
        q_ref = torch.cat([apply_rope_half(qraw[:, :r], cos, sin), qraw[:, r:]], -1)
        k_ref = torch.cat([apply_rope_half(kn[:r], cos, sin), kn[r:]], -1)
        w_ref = F.linear(x.double(), ix.weights_proj.weight.double()) * (H ** -0.5 * D ** -0.5)
    row = torch.zeros(D, dtype=torch.bfloat16)
    q, k, w = cpu_sparse.index_qkw(x, ql, ix.wq_b.weight, ix.wk.weight, ix.k_norm.weight, ix.k_norm.bias, 1e-6,
                                   cos, sin, ix.weights_proj.weight, H ** -0.5 * D ** -0.5, H, r, k_out=row)
    assert k is row
    # bf16 values one rounding step apart at most (an fp32 sum landing on the other side of a tie)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=2 ** -7, atol=2 ** -7 * q_ref.abs().max().item())
    torch.testing.assert_close(k.float(), k_ref.float(), rtol=2 ** -7, atol=2 ** -7 * k_ref.abs().max().item())
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cos must be 16"):
        cpu_sparse.index_qkw(x, ql, ix.wq_b.weight, ix.wk.weight, ix.k_norm.weight, ix.k_norm.bias, 1e-6,
                             cos[:8], sin, ix.weights_proj.weight, 1.0, H, r)


def _decode_run(ix, fused: bool, B=2, S=120, P=30, seed=5):
    """Prefill P tokens through forward, then select each later position: with fused, by the fast
    path's ``select`` (C where it may run), else by the model's ``decode_select`` (the torch
    reference). Returns the selections, the cache and the count of C selections."""
    g = torch.Generator().manual_seed(seed)
    dt = ix.wk.weight.dtype
    x = torch.randn(B, S, 256, generator=g).to(dt)
    ql = torch.randn(B, S, 96, generator=g).to(dt)
    ang = torch.arange(S)[:, None] * torch.rand(ix.rope_dim // 2, generator=g)
    cos, sin = ang.cos(), ang.sin()
    cache = IndexerKeyCache(ix.head_dim, 1, B, S + 8, "bf16", torch.bfloat16, "cpu")
    calls = [0]
    orig = fast_sparse.select_fused

    def counted(*a):
        calls[0] += 1
        return orig(*a)
    fast_sparse.select_fused = counted
    sels = []
    try:
        with torch.no_grad():
            ix(x[:, :P], ql[:, :P], cos[:P], sin[:P], 0, cache, 0)
            for t in range(P, S):
                s = slice(t, t + 1)
                select = fast_sparse.select if fused else type(ix).decode_select
                sels.append(select(ix, x[:, s], ql[:, s], cos[s], sin[s], t, cache, 0))
    finally:
        fast_sparse.select_fused = orig
    return sels, cache, calls[0]


# 48: not a multiple of 32, the AMX tiles decline (without AMX always): then the C scorer and top-k,
# or torch's GEMM and the C top-k where the C scorer lost to torch on this CPU (c_scores False)
@pytest.mark.parametrize("D,c_scores", [(64, True), (48, True), (48, False)])
def test_fused_decode_select_matches_the_torch_decode_path(D, c_scores, monkeypatch):
    from dsv3lab.kernels import cpu_calibrate
    real = cpu_calibrate.wins
    monkeypatch.setattr(cpu_calibrate, "wins", lambda k, dt: (c_scores if k == "index_scores" else real(k, dt)))
    ix = _indexer(D=D)
    fused, c1, n1 = _decode_run(ix, True)
    plain, c0, n0 = _decode_run(ix, False)
    assert n1 == len(fused) and n0 == 0                    # each path took the branch it claims
    # the cached keys: the same values up to one bf16 rounding step
    k0, k1 = c0.read(0, 2, 120).float(), c1.read(0, 2, 120).float()
    assert (k0 - k1).abs().max().item() <= 2 ** -7 * k0.abs().max().item()
    assert (k0 != k1).float().mean().item() < 0.02
    for t, (a, b) in enumerate(zip(fused, plain)):
        assert a.shape == b.shape
        for ra, rb in zip(a.tolist(), b.tolist()):
            assert set(ra) == set(rb), f"position {30 + t}"


def test_fused_decode_select_steps_aside_for_hooks_fp32_and_a_missing_library(monkeypatch):
    ix = _indexer()
    seen = []
    h = ix.hook_q.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    _, _, n = _decode_run(ix, True, S=40)
    h.remove()
    assert n == 0 and len(seen) == 1 + 10                   # the prefill and every decode step fired it
    _, _, n = _decode_run(ix, True, S=40)
    assert n == 10                                          # the fused path, once nothing is hooked

    class Wrapped(type(ix.wq_b)):                           # e.g. an adapter around the same weight
        pass
    plain_wq_b = ix.wq_b
    ix.wq_b = Wrapped(plain_wq_b.in_features, plain_wq_b.out_features, torch.bfloat16)
    ix.wq_b.weight = plain_wq_b.weight
    _, _, n = _decode_run(ix, True, S=40)
    assert n == 0
    ix.wq_b = plain_wq_b
    monkeypatch.setattr(cpu_sparse, "library", lambda: None)
    sels, _, n = _decode_run(ix, True, S=40)
    assert n == 0 and len(sels) == 10
    monkeypatch.undo()
    _, _, n = _decode_run(ix.float(), True, S=40)          # fp32 weights: not the bf16 kernels' job
    assert n == 0


def test_fused_decode_select_steps_aside_for_a_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    ix = _indexer()
    with FlopCounterMode(display=False) as fc:
        _, _, n = _decode_run(ix, True, S=40)
    assert n == 0 and fc.get_total_flops() > 0              # the torch path ran, and was counted


def test_fused_decode_runs_in_the_bf16_model_and_keeps_its_logits(monkeypatch):
    """The whole model's decode (batch 1: the fused step) with the C selection against the same
    model with it off."""
    cfg = dsv3lab.ModelConfig.preset("tiny").replace(index_n_heads=8, index_head_dim=32, index_topk=6,
                                                     num_nextn_predict_layers=0, name="tiny-v32")
    m = set_key_format(dsv3lab.build(cfg, seed=0, dtype=torch.bfloat16).eval(), "bf16")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for blk in m.layers:
            ix = blk.self_attn.indexer
            for p in (ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randint(0, cfg.vocab_size, (1, 30), generator=g)
    calls = []
    orig = fast_sparse.select_fused
    monkeypatch.setattr(fast_sparse, "select_fused", lambda *a: calls.append(1) or orig(*a))

    def run():
        cache = m.new_cache(1, 30)
        with torch.no_grad():
            m(x[:, :20], cache=cache)
            return torch.cat([m(x[:, t:t + 1], start=t, cache=cache) for t in range(20, 30)], 1).float()
    fused = run()
    assert calls, "the C selection did not run"
    monkeypatch.setattr(fast_sparse, "selection_layout", lambda *a: None)
    calls.clear()
    plain = run()
    assert not calls
    assert ((fused - plain).abs().max() / plain.abs().max()).item() < 1e-2
