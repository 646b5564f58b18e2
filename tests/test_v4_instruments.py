"""The lab's instruments on DeepSeek-V4: hook points at stable names (compressor entries, CSA
selection, sinks' share, mHC streams and mixing matrices), routing traces over hash and learned
layers, replay, ablation and the logit lens."""

import torch

import dsv3lab
from dsv3lab.probes import run_with_cache

X = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(0))


def model():
    m = dsv3lab.build("v4-tiny", seed=1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1 or "position_bias" in n:
                p.normal_(0, 0.5)
    return m


def test_v4_hook_points():
    m = model()
    logits, cache = run_with_cache(m, X, names_filter=[
        "layers.1.self_attn.hook_sink_share", "layers.1.self_attn.hook_attn_probs",
        "layers.1.self_attn.compressor.hook_entries", "layers.1.self_attn.compressor.indexer.hook_topk_indices",
        "layers.2.self_attn.compressor.hook_entries", "layers.0.attn_hc.hook_comb", "layers.3.hook_resid_post",
        "layers.0.mlp.gate.hook_topk_ids"])
    with torch.no_grad():
        assert torch.equal(logits, m(X))                                # observing changes nothing
    probs, sink = cache["layers.1.self_attn.hook_attn_probs"], cache["layers.1.self_attn.hook_sink_share"]
    assert torch.allclose(probs.sum(-1) + sink, torch.ones_like(sink), atol=1e-5)   # the sink takes the rest
    assert probs.shape[-1] == 21 + 21 // 4                              # window rows, then CSA entries
    assert cache["layers.1.self_attn.compressor.hook_entries"].shape == (2, 21 // 4, 32)
    assert cache["layers.2.self_attn.compressor.hook_entries"].shape == (2, 21 // 8, 32)
    idx = cache["layers.1.self_attn.compressor.indexer.hook_topk_indices"]
    assert idx.shape == (2, 21, 3) and int(idx[:, :3].max()) == -1      # nothing closed before t = 3
    comb = cache["layers.0.attn_hc.hook_comb"]
    assert comb.shape == (2, 21, 2, 2)
    assert torch.allclose(comb.sum(-2), torch.ones(2, 21, 2), atol=1e-4)  # Sinkhorn: columns sum to 1
    assert torch.allclose(comb.sum(-1), torch.ones(2, 21, 2), atol=1e-3)  # and rows nearly
    assert cache["layers.3.hook_resid_post"].shape == (2, 21, 2, 64)
    # the hash layer's experts are the table's
    assert torch.equal(cache["layers.0.mlp.gate.hook_topk_ids"], m.layers[0].mlp.gate.tid2eid[X.reshape(-1)])


def test_v4_trace_replay_ablation_and_lens():
    m = model()
    with dsv3lab.trace(m) as t:
        ref = m(X)
    load = t.routing.expert_load()
    assert load.shape == (4, 8) and int(load.sum()) == 4 * 2 * 21 * 2
    with dsv3lab.replay(m, t.routing):
        assert torch.equal(m(X), ref)
    with dsv3lab.ablate_experts(m, {2: [0, 1]}, mode="reroute"):
        _, cache = run_with_cache(m, X, names_filter="layers.2.mlp.gate.hook_topk_ids")
        assert not torch.isin(cache["layers.2.mlp.gate.hook_topk_ids"], torch.tensor([0, 1])).any()
    import pytest
    with pytest.raises(ValueError, match="hash-routed layer"):
        with dsv3lab.ablate_experts(m, {0: [0]}, mode="reroute"):
            m(X)
    lens = dsv3lab.logit_lens(m, X)
    assert lens.shape == (4, 2, 21, 512)
    assert torch.allclose(lens[-1], ref, atol=1e-5)                     # the last row is the model
