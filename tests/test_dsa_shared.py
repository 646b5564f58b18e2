"""GLM-5 (``glm_moe_dsa``): V3.2's DSA with the indexer's RoPE on interleaved pairs and "shared"
layers that reuse the last full layer's selection. Parity with transformers' GlmMoeDsaForCausalLM
in fp32 (logits, each full layer's key sets, cached decode, greedy generation), the shared layers'
empty key cache, the named error for a shared layer run out of order, and the CPU fast path
declining what its C does not compute (interleaved indexer RoPE, shared layers) with the module
path's result."""

import pytest
import torch

import dsv3lab
from dsv3lab.config import ModelConfig

transformers = pytest.importorskip("transformers")
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM  # noqa: E402

from hf_reference import eager_model, save_eager  # noqa: E402

# 16 indexer heads and weights N(0, 0.2): index scores well apart (no near-ties, which transformers
# and we break differently); rms_norm_eps 1e-5 as GLM-5 (the latent norms keep 1e-6)
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
            first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=48, kv_lora_rank=32,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512,
            initializer_range=0.05, index_n_heads=16, index_head_dim=32, index_topk=6, rms_norm_eps=1e-5)
CASES = {
    # full, shared, full, shared
    "alternate": dict(indexer_types=["full", "shared", "full", "shared"]),
    # transformers' schedule: freq 3, offset 1 -> full, shared, shared, full
    "freq-schedule": dict(index_topk_freq=3, index_skip_topk_offset=1),
    "yarn-two-shared": dict(indexer_types=["full", "shared", "shared", "full"], rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32.0, beta_slow=1.0,
        mscale=1.0, mscale_all_dim=1.0, rope_theta=10000.0), first_k_dense_replace=0),
}
X = torch.randint(0, BASE["vocab_size"], (3, 29), generator=torch.Generator().manual_seed(1))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_hf(tmp_path, case, **over):
    m = eager_model(GlmMoeDsaConfig, GlmMoeDsaForCausalLM, **dict(BASE, **CASES[case], **over))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("k_norm.bias"):
                p.normal_(0, 0.3)
            elif ".indexer." in n and p.dim() == 2:
                p.normal_(0, 0.2)
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    d = tmp_path / case
    save_eager(m, d)
    return m, d


def as_sets(idx):
    B, S, _ = idx.shape
    return [[{t for t in idx[b, s].tolist() if 0 <= t <= s} for s in range(S)] for b in range(B)]


@pytest.mark.parametrize("case", list(CASES))
def test_glm5_matches_transformers(tmp_path, case):
    m, d = make_hf(tmp_path, case)
    ours = dsv3lab.load(d, dtype=torch.float32)
    types = list(m.config.indexer_types)
    assert "shared" in types and list(ours.cfg.indexer_types) == types and ours.cfg.index_rope_interleave
    assert [hasattr(b.self_attn, "indexer") for b in ours.layers] == [t == "full" for t in types]
    ref_sel, got_sel = [], []
    hooks = [layer.self_attn.register_forward_hook(lambda mod, i, o: ref_sel.append(o[2].long()))
             for layer, t in zip(m.model.layers, types) if t == "full"]
    hooks += [b.self_attn.indexer.hook_topk_indices.register_forward_hook(lambda mod, i, o: got_sel.append(o))
              for b in ours.layers if hasattr(b.self_attn, "indexer")]
    with torch.no_grad():
        ref, got = m(X).logits, ours(X)
    for h in hooks:
        h.remove()
    assert len(ref_sel) == len(got_sel) == types.count("full")
    for a, b in zip(ref_sel, got_sel):
        assert as_sets(a) == as_sets(b), "indexer selections differ from transformers"
    err = (got - ref).abs().max().item()
    print(f"glm_moe_dsa {case}: max abs logit error {err:.2e}")
    assert err < 1e-5
    with torch.no_grad():
        # the shared layers matter: giving each its own selection (dense) changes the logits
        assert rel(ours.set_attn_mode("absorbed")(X), ref) > 1e-2
        ours.set_attn_mode("sparse")
        cache = ours.new_cache(3, 29)
        for i, t in enumerate(types):   # a shared layer caches no indexer keys
            assert cache.index_keys.layers[i].shape[1] == (29 if t == "full" else 0)
        parts = [ours(X[:, :10], start=0, cache=cache), ours(X[:, 10:13], start=10, cache=cache)]
        parts += [ours(X[:, t:t + 1], start=t, cache=cache) for t in range(13, 29)]
    assert (torch.cat(parts, 1) - ref).abs().max().item() < 1e-5
    want = m.generate(X[:1, :12], max_new_tokens=10, do_sample=False, min_new_tokens=10, eos_token_id=None,
                      pad_token_id=0)[0, 12:].tolist()
    assert ours.generate([X[0, :12].tolist()], max_new_tokens=10, stop_tokens=[])[0] == want


def test_glm5_config_round_trip_and_bad_fields():
    hf = GlmMoeDsaConfig(**BASE, **CASES["alternate"]).to_dict()
    c = ModelConfig.from_hf(hf)
    assert c.indexer_types == ("full", "shared", "full", "shared") and c.n_indexer_layers == 2
    assert [c.index_source(i) for i in range(4)] == [0, 0, 2, 2]
    back = ModelConfig.from_hf(c.to_hf())
    assert back == c and c.to_hf()["model_type"] == "glm_moe_dsa"
    # every layer full is V3.2's layout (None), with GLM-5's RoPE
    assert ModelConfig.from_hf(dict(hf, indexer_types=["full"] * 4)).indexer_types is None
    assert ModelConfig.from_hf(dict(hf, indexer_types=None, index_topk_pattern="FSSF")).indexer_types == \
        ("full", "shared", "shared", "full")
    for bad, match in ((["shared", "full", "full", "full"], "layer 0 must be 'full'"),
                       (["full", "shared"], "one entry per layer"), (["full", "half", "full", "full"], "'full' or 'shared'")):
        with pytest.raises(dsv3lab.config.ConfigError, match=f"indexer_types.*{match}"):
            ModelConfig.from_hf(dict(hf, indexer_types=bad))
    with pytest.raises(dsv3lab.config.ConfigError, match="index_topk_pattern"):
        ModelConfig.from_hf(dict(hf, indexer_types=None, index_topk_pattern="FXSF"))


def _tiny(dtype, indexer_types=None, seed=0):
    cfg = ModelConfig.preset("tiny").replace(index_n_heads=8, index_head_dim=32, index_topk=6, num_nextn_predict_layers=0,
                                              index_rope_interleave=True, name="tiny-glm5")
    if indexer_types:
        cfg = cfg.replace(num_hidden_layers=len(indexer_types), indexer_types=tuple(indexer_types))
    m = dsv3lab.build(cfg, seed=seed, dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for blk in m.layers:
            if hasattr(blk.self_attn, "indexer"):
                ix = blk.self_attn.indexer
                for p in (ix.wq_b.weight, ix.wk.weight, ix.weights_proj.weight):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def test_shared_layer_out_of_order_is_named():
    m = _tiny(torch.float32, ["full", "shared", "full"])
    x = torch.randint(0, m.cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m(x)                                             # layer 2 left its selection for [0, 9)
        cos, sin = m.rope.get(0, 5, m.device)
        h = m.embed(x[:, :5])
        with pytest.raises(RuntimeError, match="layer 1 is a shared indexer layer.*layer 0 selected for positions "
                                               r"\[0, 5\).*layer 2's for positions \[0, 9\)"):
            m.layers[1](h, cos, sin)


def _decode(model, x, prefill, hook_topk=False):
    handles = [b.self_attn.indexer.hook_topk_indices.register_forward_hook(lambda mod, i, o: None)
               for b in model.layers if hook_topk and hasattr(b.self_attn, "indexer")]
    cache = model.new_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        model(x[:, :prefill], cache=cache)
        out = [model(x[:, t:t + 1], start=t, cache=cache) for t in range(prefill, x.shape[1])]
    for h in handles:
        h.remove()
    return torch.cat(out, 1).float()


def test_c_selection_declines_interleaved_rope():
    """The C selection rotates the indexer's RoPE in half-split pairs: for GLM-5's interleaved
    pairs ``selection_layout`` declines (the model's decode_select runs); the same indexer with
    V3.2's pairing is taken where this machine has the kernels."""
    from dsv3lab.fast.sparse import selection_layout
    m = _tiny(torch.bfloat16)
    ix = m.layers[0].self_attn.indexer
    cache = m.new_cache(1, 16).index_keys
    x = torch.randn(1, 1, m.cfg.hidden_size, dtype=torch.bfloat16)
    q_latent = torch.randn(1, 1, m.cfg.q_lora_rank, dtype=torch.bfloat16)
    cos, _ = m.rope.get(3, 4, m.device)
    with torch.no_grad():
        assert ix.rope_interleave and selection_layout(ix, x, q_latent, cos, cache, 0) is None
        ix.rope_interleave = False
        half = selection_layout(ix, x, q_latent, cos, cache, 0)
    from dsv3lab.kernels import cpu_sparse
    if cpu_sparse.library() is not None and half is None:
        pytest.skip("the C selection is not used on this machine (calibrated slower, or not built)")


@pytest.mark.parametrize("types", [None, ("full", "shared", "full", "shared")], ids=["interleaved", "shared"])
def test_fast_path_decode_is_the_module_paths(types):
    """bf16 decode at batch 1 (where the fused CPU step may run): a model with shared layers is
    declined by the fused step as a whole; either model decodes as the general (hooked) path,
    step by step up to bf16 rounding (the median step; a near-tied key may flip in one step)."""
    from dsv3lab.fast import decode
    m = _tiny(torch.bfloat16, types)
    x = torch.randint(0, m.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    fast = _decode(m, x, prefill=20)
    general = _decode(m, x, prefill=20, hook_topk=True)
    per_step = sorted(rel(fast[:, i], general[:, i]) for i in range(fast.shape[1]))
    assert per_step[len(per_step) // 2] < 1e-2, per_step
    assert (fast.argmax(-1) == general.argmax(-1)).float().mean() >= 0.8
    if types is not None:
        cache = m.new_cache(1, 30)
        with torch.no_grad():
            m(x[:, :20], cache=cache)
            assert decode(m, x[:, 20:21], 20, cache) is None      # the fused step declined the model
    with torch.no_grad():
        dense = _decode(m.set_attn_mode("absorbed"), x, prefill=20)
    assert rel(dense, general) > 0.05


def test_kv_bytes_count_only_full_layers_keys():
    """Analytic KV bytes per token (latent in every layer, indexer keys in full layers only) equal
    the allocated cache's, and the shared layers save their keys."""
    from dsv3lab.probes.memory import bytes_per_token, measured_bytes_per_token
    m = _tiny(torch.float32, ["full", "shared", "shared", "full"])
    cfg = m.cfg
    want = bytes_per_token(cfg, torch.float32, "sparse", index_keys="model")
    assert want == measured_bytes_per_token(m, "sparse", torch.float32, include_mtp=False)
    latent = 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert want == latent + 2 * cfg.index_head_dim * 4
    assert bytes_per_token(cfg.replace(indexer_types=None), torch.float32, "sparse", index_keys="model") == \
        latent + 4 * cfg.index_head_dim * 4


def test_saved_glm5_model_loads_in_transformers(tmp_path):
    """dsv3lab.save of a model with shared layers writes a glm_moe_dsa checkpoint that the lab and
    transformers' GlmMoeDsaForCausalLM both load with the same logits (fp32)."""
    m = _tiny(torch.float32, ["full", "shared", "full", "shared"])
    d = dsv3lab.save(m, tmp_path / "glm5")
    x = torch.randint(0, m.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    hf = GlmMoeDsaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert list(hf.config.indexer_types) == ["full", "shared", "full", "shared"]
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(dsv3lab.load(d)(x), ref)
        assert (hf(x).logits - ref).abs().max().item() < 1e-5


def test_dsa_cost_counts_the_indexer_in_full_layers_only():
    from dsv3lab.probes import dsa_cost
    m = _tiny(torch.float32, ["full", "shared", "shared", "full"])
    every = m.cfg.replace(indexer_types=None)
    kv, kv_all = dsa_cost.kv_bytes_per_token(m.cfg), dsa_cost.kv_bytes_per_token(every)
    assert kv["latent"] == kv_all["latent"] and kv["indexer"] == kv_all["indexer"] / 2
    row = [r for r in dsa_cost.cost_curves(m.cfg, [64]) if r["mode"] == "sparse"][0]
    row_all = [r for r in dsa_cost.cost_curves(every, [64]) if r["mode"] == "sparse"][0]
    assert row["indexer_flops"] == row_all["indexer_flops"] / 2 and row["core_flops"] == row_all["core_flops"]
    assert row["flops"] == row["core_flops"] + row["indexer_flops"]
