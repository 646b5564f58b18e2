"""DeepSeek-V4 in the engine: logits and cached greedy decode against transformers'
DeepseekV4ForCausalLM (fp32, eager), the presets' parameter counts, the checkpoint layouts.

Each case is a random small V4 saved by transformers (``save_pretrained``: its own layout) and
loaded by ``dsv3lab.load``. Before logits are compared the discrete choices must agree: each MoE
layer's experts per token (learned and hash-routed) and each CSA layer's compressed entries per
query. Parameters transformers initialises to constants (sinks, position biases, the mHC bases
and scales, norms, the gate bias, the hash table) are randomised first, so a port that ignored one
would be caught.
"""

import pytest
import torch

import dsv3lab
from dsv3lab.config import ConfigError, V4Config

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

SMALL = dict(vocab_size=160, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
             q_lora_rank=24, partial_rotary_factor=8 / 32, n_routed_experts=8, num_experts_per_tok=2,
             o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, sliding_window=8,
             max_position_embeddings=512, initializer_range=0.05)

CASES = {
    # every layer type and both routers; sqrtsoftplus, YaRN on the compressed branches, 2 streams
    "all-types": dict(num_hidden_layers=4, hc_mult=2, scoring_func="sqrtsoftplus", index_topk=3,
                      layer_types=["sliding_attention", "compressed_sparse_attention",
                                   "heavily_compressed_attention", "compressed_sparse_attention"],
                      mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
                      compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                      rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                           beta_fast=32.0, beta_slow=1.0)),
    # sigmoid router, four streams, HCA then CSA, plain RoPE, two hash layers
    "sigmoid-hc4": dict(num_hidden_layers=3, hc_mult=4, scoring_func="sigmoid", index_topk=2,
                        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention"],
                        mlp_layer_types=["hash_moe", "hash_moe", "moe"],
                        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 16}),
    # a single stream, CSA with a window of 4 and top-5 (transformers 5.24 cannot build a
    # "softmax" V4 router: ACT2FN has no "softmax"; ours is tested in test_v4_softmax_router)
    "hc1-window4": dict(num_hidden_layers=2, hc_mult=1, scoring_func="sqrtsoftplus", index_topk=5, sliding_window=4,
                        layer_types=["compressed_sparse_attention", "sliding_attention"],
                        mlp_layer_types=["moe", "hash_moe"],
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}),
}


def make_hf(tmp_path, case, seed=0):
    torch.manual_seed(seed)
    cfg = DeepseekV4Config(**dict(SMALL, **CASES[case]))
    cfg._attn_implementation = "eager"
    m = DeepseekV4ForCausalLM(cfg).float().eval()
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=g)
            elif p.dim() == 1 or "position_bias" in n:
                p.normal_(0, 0.5, generator=g)
        for n, b in m.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(b.shape[0])]))
            elif n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3, generator=g)
    m.set_experts_implementation("eager")
    d = tmp_path / case
    m.save_pretrained(d)
    return m, d


def hf_choices(m, x):
    """Logits, experts per MoE layer [T,k] (sorted), compressed entries per CSA query [B,S,k] (sorted)."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M
    ids, sel, hooks = [], [], []
    for mod in m.modules():
        if isinstance(mod, (M.DeepseekV4TopKRouter, M.DeepseekV4HashRouter)):
            hooks.append(mod.register_forward_hook(lambda _m, _i, o: ids.append(o[2].sort(-1).values)))
        if isinstance(mod, M.DeepseekV4Indexer):
            hooks.append(mod.register_forward_hook(lambda _m, _i, o: sel.append(o.sort(-1).values)))
    try:
        with torch.no_grad():
            logits = m(x).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, ids, sel


def our_choices(model, x):
    ids, sel, hooks = [], [], []
    for blk in model.layers:
        hooks.append(blk.mlp.gate.hook_topk_ids.register_forward_hook(lambda _m, _i, o: ids.append(o.sort(-1).values)))
        comp = blk.self_attn.compressor
        if comp is not None and comp.indexer is not None:
            hooks.append(comp.indexer.hook_topk_indices.register_forward_hook(
                lambda _m, _i, o: sel.append(o.sort(-1).values)))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, ids, sel


@pytest.mark.parametrize("case", list(CASES))
def test_v4_logits_match_transformers(tmp_path, case):
    m, d = make_hf(tmp_path, case)
    ours = dsv3lab.load(d, dtype=torch.float32)
    assert type(ours).__name__ == "V4Transformer" and ours.cfg.layer_types == tuple(CASES[case]["layer_types"])
    x = torch.randint(0, SMALL["vocab_size"], (2, 41), generator=torch.Generator().manual_seed(3))
    ref, ref_ids, ref_sel = hf_choices(m, x)
    got, got_ids, got_sel = our_choices(ours, x)
    assert len(ref_ids) == len(got_ids) == ours.cfg.num_hidden_layers
    for a, b in zip(ref_ids, got_ids):
        assert torch.equal(a, b), "routing differs from transformers"
    assert len(ref_sel) == len(got_sel) == ours.cfg.layer_types.count("compressed_sparse_attention")
    for a, b in zip(ref_sel, got_sel):
        assert torch.equal(a, b), "CSA selection differs from transformers"
    err = (got - ref).abs().max().item()
    print(f"{case}: max abs logit error {err:.3e} (logits up to {ref.abs().max().item():.3f})")
    assert err < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_v4_cached_decode_equals_forward_and_transformers_greedy(tmp_path, case):
    m, d = make_hf(tmp_path, case)
    ours = dsv3lab.load(d, dtype=torch.float32)
    x = torch.randint(0, SMALL["vocab_size"], (2, 37), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(x)
        for prefill in (1, 6, 17):                     # window and compression boundaries fall inside
            cache = ours.new_cache(2, 64)
            steps = [ours(x[:, :prefill], start=0, cache=cache)]
            steps += [ours(x[:, t:t + 1], start=t, cache=cache) for t in range(prefill, 37)]
            assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5, prefill
        assert cache.nbytes() > 0
        prompt = x[:1, :13]
        ref = m.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                         eos_token_id=None, pad_token_id=0)[0, 13:].tolist()
    got = ours.generate([prompt[0].tolist()], max_new_tokens=12, stop_tokens=[])[0]
    assert got == ref


def test_v4_cache_must_be_fed_in_order():
    model = dsv3lab.build("v4-tiny")
    cache = model.new_cache(1, 32)
    model(torch.tensor([[1, 2, 3]]), start=0, cache=cache)
    with pytest.raises(ValueError, match="fed in order"):
        model(torch.tensor([[4]]), start=5, cache=cache)


def test_v4_presets_match_the_published_totals():
    """V4-Flash 284B total / 13B activated, V4-Pro 1.6T / 49B (model cards), counted on meta
    without the MTP block (built, one per preset), as V3's 671B leaves its MTP module out."""
    for name, total, unit, active in (("v4-flash", 284, 1e9, 13), ("v4-pro", 1.6, 1e12, 49)):
        m = dsv3lab.build(name, device="meta")
        assert len(m.mtp) == m.cfg.num_nextn_predict_layers == 1
        main = [(n, p) for n, p in m.named_parameters() if not n.startswith("mtp.")]
        tot = sum(p.numel() for _, p in main)
        routed = sum(p.numel() for n, p in main if ".experts." in n)
        act = tot - routed + routed * m.cfg.num_experts_per_tok // m.cfg.n_routed_experts
        digits = 0 if unit == 1e9 else 1
        assert round(tot / unit, digits) == total, (name, tot)
        assert int(act / 1e9) == active, (name, act)


def test_v4_config_round_trips_and_reads_the_release_form():
    c = V4Config.preset("v4-tiny")
    assert V4Config.from_hf(c.to_hf()) == c.replace(name="hf")
    hf = DeepseekV4Config(**{k: v for k, v in c.to_hf().items() if k not in ("architectures", "torch_dtype")})
    assert V4Config.from_hf(hf.to_dict()).replace(name="hf") == c.replace(name="hf")
    release = dict(model_type="deepseek_v4", num_hidden_layers=5, compress_ratios=[0, 0, 4, 128, 4, 0],
                   num_hash_layers=2, rope_scaling=dict(type="yarn", factor=16, original_max_position_embeddings=65536,
                                                        beta_fast=32, beta_slow=1),
                   quantization_config=dict(quant_method="fp8", weight_block_size=[128, 128], scale_fmt="ue8m0"),
                   expert_dtype="fp4")
    r = V4Config.from_hf(release)
    assert r.layer_types == ("sliding_attention",) * 2 + ("compressed_sparse_attention", "heavily_compressed_attention",
                                                          "compressed_sparse_attention")
    assert r.mlp_layer_types == ("hash_moe",) * 2 + ("moe",) * 3
    assert r.yarn["factor"] == 16 and r.scale_fmt == "ue8m0" and r.expert_dtype == "fp4"
    with pytest.raises(ConfigError, match="compress_ratios holds 8"):
        V4Config.from_hf(dict(release, compress_ratios=[8] * 5))


def test_v4_softmax_router():
    from dsv3lab.model.v4_moe import score
    cfg = V4Config.preset("v4-tiny").replace(scoring_func="softmax")
    model = dsv3lab.build(cfg)
    gate = model.layers[1].mlp.gate
    x = torch.randn(5, cfg.hidden_size)
    ids, w = gate(x, None)
    s = (x @ gate.weight.T).softmax(-1)
    assert torch.equal(ids, (s + gate.e_score_correction_bias).topk(cfg.num_experts_per_tok).indices)
    sel = s.gather(1, ids)
    assert torch.allclose(w, sel / sel.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    assert torch.allclose(score(torch.tensor([0.0]), "sqrtsoftplus"), torch.tensor([0.6931472]).sqrt())


def test_v4_bf16_runs_and_caches_like_its_forward():
    m32 = dsv3lab.build("v4-tiny", seed=0)
    m16 = dsv3lab.build("v4-tiny", seed=0, dtype=torch.bfloat16)
    x = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, ref = m16(x), m32(x)
        cache = m16.new_cache(2, 30)
        steps = [m16(x[:, :7], start=0, cache=cache)] + [m16(x[:, t:t + 1], start=t, cache=cache) for t in range(7, 30)]
    assert full.dtype == torch.bfloat16
    assert (torch.cat(steps, 1).float() - full.float()).abs().max().item() < 1e-2
    assert ((full.float() - ref).abs().max() / ref.abs().max()).item() < 0.1
