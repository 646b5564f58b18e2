"""The DSA decode fast path (``SparseAttention.decode_gathered`` after ``Indexer.decode_select``:
unsorted top-k, the selected latent rows gathered into one buffer, the absorbed one-token decode
over them) against the general path it stands in for: the same key sets, the same logits as both
the general gathered path and the masked reference (dense absorbed attention restricted by a
[B,S,T] keep mask), and the fast path is taken exactly when no hook would miss what it skips."""

import pytest
import torch

import dsv3lab
from dsv3lab.model.attn_sparse import set_key_format
from dsv3lab.model.indexer import IndexerKeyCache, decode_topk, select_topk

TOPK = 6


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _model(dtype=torch.float32, topk=TOPK, seed=0):
    cfg = dsv3lab.ModelConfig.preset("tiny").replace(index_n_heads=8, index_head_dim=32, index_topk=topk,
                                                     num_nextn_predict_layers=0, name="tiny-v32")
    m = dsv3lab.build(cfg, seed=seed, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for blk in m.layers:
            ix = blk.self_attn.indexer
            for p in (ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight):
                # scores spread well beyond rounding, so no selection sits on a near-tie
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _count_fast(model):
    """Wrap every layer's decode_gathered to count the fast-path calls; returns the counter."""
    n = [0]
    for blk in model.layers:
        impl = blk.self_attn.impl
        f = impl.decode_gathered

        def counted(*a, f=f):
            n[0] += 1
            return f(*a)
        impl.decode_gathered = counted
    return n


def _decode_logits(model, x, prefill, hook=None):
    """Prefill x[:, :prefill], then decode the rest one token at a time; ``hook`` names a hook
    point ("topk" = indexer.hook_topk_indices, "probs" = MLA's hook_attn_probs) to attach a
    no-op hook to in every layer, forcing the general path. Returns the decode logits."""
    handles = []
    for blk in model.layers:
        mla = blk.self_attn
        point = {"topk": mla.indexer.hook_topk_indices, "probs": mla.hook_attn_probs, None: None}[hook]
        if point is not None:
            handles.append(point.register_forward_hook(lambda mod, i, o: None))
    B, S = x.shape
    cache = model.new_cache(B, S)
    out = []
    with torch.no_grad():
        model(x[:, :prefill], cache=cache)
        for t in range(prefill, S):
            out.append(model(x[:, t:t + 1], start=t, cache=cache))
    for h in handles:
        h.remove()
    return torch.cat(out, 1)


@pytest.mark.parametrize("key_format", ["model", "bf16", "fp8"])
def test_fast_decode_matches_the_general_and_masked_paths_fp32(key_format):
    m = set_key_format(_model(), key_format)
    x = torch.randint(0, m.cfg.vocab_size, (3, 30), generator=torch.Generator().manual_seed(2))
    fast_calls = _count_fast(m)
    fast = _decode_logits(m, x, prefill=20)
    L = m.cfg.num_hidden_layers
    assert fast_calls[0] == L * 10                      # every decode step of every layer took it
    general = _decode_logits(m, x, prefill=20, hook="topk")
    masked = _decode_logits(m, x, prefill=20, hook="probs")
    assert fast_calls[0] == L * 10                      # ... and no hooked step did
    assert rel(fast, masked) < 1e-5, f"fast vs masked: {rel(fast, masked):.2e}"
    assert rel(general, masked) < 1e-5
    # the selection matters at these positions (k = 6 of 21..30 keys): dense MLA differs
    m.set_attn_mode("absorbed")
    dense = _decode_logits(m, x, prefill=20)
    assert rel(dense, masked) > 1e-2


def test_fast_decode_matches_the_general_path_bf16():
    # bf16 against the general gathered path (the masked one rounds differently in bf16, which is
    # enough to flip near-tied selections in later layers: not what is tested here)
    m = set_key_format(_model(torch.bfloat16), "bf16")
    x = torch.randint(0, m.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    fast_calls = _count_fast(m)
    fast = _decode_logits(m, x, prefill=20).float()
    assert fast_calls[0] == m.cfg.num_hidden_layers * 10
    general = _decode_logits(m, x, prefill=20, hook="topk").float()
    m.set_attn_mode("absorbed")
    dense = _decode_logits(m, x, prefill=20).float()
    assert rel(fast, general) < 1e-2, f"fast vs general: {rel(fast, general):.2e}"
    assert rel(dense, general) > 0.1


@pytest.mark.parametrize("key_format", ["model", "bf16", "fp8"])
def test_decode_select_picks_forwards_key_sets(key_format):
    m = _model()
    ix = m.layers[1].self_attn.indexer
    ix.key_format = key_format
    B, S, P = 3, 40, 16
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, S, m.cfg.hidden_size, generator=g)
    ql = torch.randn(B, S, m.cfg.q_lora_rank, generator=g)
    cos, sin = m.rope.get(0, S, "cpu")
    caches = [IndexerKeyCache(ix.head_dim, 1, B, S, key_format, torch.float32, "cpu") for _ in range(2)]
    # the fast path's cache holds large stale keys past every written position (a longer
    # sequence's, say): a step that scored them would select future positions
    stale = caches[1].layers[0]
    for t in (stale if isinstance(stale, tuple) else (stale,)):
        t.copy_((torch.randn(t.shape, generator=g) * 100).to(t.dtype))
    with torch.no_grad():
        for c in caches:
            ix(x[:, :P], ql[:, :P], cos[:P], sin[:P], 0, c, 0)
        for t in range(P, S):
            span = slice(t, t + 1)
            ref = ix(x[:, span], ql[:, span], cos[span], sin[span], t, caches[0], 0)[:, 0]      # [B,k]
            got = ix.decode_select(x[:, span], ql[:, span], cos[span], sin[span], t, caches[1], 0)
            assert got.shape == ref.shape == (B, TOPK)
            assert [set(r) for r in got.tolist()] == [set(r) for r in ref.tolist()], f"position {t}"
    assert torch.equal(caches[0].read(0, B, S), caches[1].read(0, B, S))      # the same keys cached
    if key_format != "fp8":                     # the bucketed read is a view of the stored keys
        assert caches[1].read_bucketed(0, B, 3, 256).shape == (B, S, ix.head_dim)
        assert caches[1].read_bucketed(0, B, 3, 2).data_ptr() == caches[1].layers[0].data_ptr()
        assert caches[1].read_bucketed(0, B, 3, 2).shape[1] == 4


def test_decode_topk_keeps_select_topks_tie_rule():
    g = torch.Generator().manual_seed(5)
    # many exact zeros (every relu term off) and repeated values: ties at the k-th score
    s = torch.randint(-2, 3, (4, 50), generator=g).float().clamp_min(0)
    s[1] = torch.randn(50, generator=g)                                  # one row without ties
    for k in (1, 5, 17, 49, 50, 64):
        got = decode_topk(s, k)
        ref = select_topk(s[:, None], k)[:, 0]
        assert [set(r) for r in got.tolist()] == [set(r) for r in ref.tolist()], k
