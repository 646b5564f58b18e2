"""Mistral Small 4 (``mistral4``): V3's MLA and MoE with a softmax router without bias and
llama-4 query scaling, loaded from a transformers-written checkpoint; logits and cached decode
against transformers' Mistral4ForCausalLM (fp32). The scaling length is set small so that most
positions of the test are scaled."""

import pytest
import torch

import dsv3lab
from dsv3lab.config import ModelConfig, UnsupportedModelType

transformers = pytest.importorskip("transformers")
from transformers import Mistral4Config, Mistral4ForCausalLM  # noqa: E402
from hf_reference import eager_model  # noqa: E402

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=24, n_routed_experts=16,
             num_experts_per_tok=4, n_shared_experts=1, max_position_embeddings=512, initializer_range=0.05,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
                                  beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                  llama_4_scaling_beta=0.1, partial_rotary_factor=8 / 24))


def make_hf(tmp_path, **over):
    m = eager_model(Mistral4Config, Mistral4ForCausalLM, **dict(SMALL, **over))
    m.set_experts_implementation("eager")
    m.save_pretrained(tmp_path / "m4")
    return m, tmp_path / "m4"


def test_mistral4_matches_transformers(tmp_path):
    m, d = make_hf(tmp_path)
    ours = dsv3lab.load(d, dtype=torch.float32)
    cfg = ours.cfg
    assert (cfg.attn_scale_beta, cfg.attn_scale_len, cfg.scoring_func) == (0.1, 8, "softmax")
    assert ours.layers[1].mlp.gate.e_score_correction_bias is None
    x = torch.randint(0, 160, (2, 41), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x).logits
        got = ours(x)
        err = (got - ref).abs().max().item()
        print(f"mistral4: max abs logit error {err:.3e}")
        assert err < 1e-5
        # the scaling matters: without it the logits differ
        off = dsv3lab.load(d, dtype=torch.float32)
        object.__setattr__(off.cfg, "attn_scale_beta", 0.0)
        assert (off(x) - ref).abs().max().item() > 1e-3
        cache = ours.new_cache(2, 41)
        steps = [ours(x[:, :9], start=0, cache=cache)] + [ours(x[:, t:t + 1], start=t, cache=cache)
                                                          for t in range(9, 41)]
        assert (torch.cat(steps, 1) - ref).abs().max().item() < 1e-5
        want = m.generate(x[:1, :12], max_new_tokens=10, do_sample=False, min_new_tokens=10, eos_token_id=None,
                          pad_token_id=0)[0, 12:].tolist()
    assert ours.generate([x[0, :12].tolist()], max_new_tokens=10, stop_tokens=[])[0] == want


def test_mistral4_config_round_trip_and_refusals():
    hf = Mistral4Config(**SMALL).to_dict()
    c = ModelConfig.from_hf(hf)
    back = ModelConfig.from_hf(c.to_hf())
    assert back == c and c.to_hf()["model_type"] == "mistral4"
    with pytest.raises(UnsupportedModelType, match="rope_interleave"):
        ModelConfig.from_hf(dict(hf, rope_interleave=False))
    # several groups: scored by their top-2 softmax scores, no bias (Mistral4TopkRouter)
    grouped = ModelConfig.from_hf(dict(hf, n_group=4, topk_group=2))
    assert (grouped.topk_method, grouped.n_group) == ("group_top2", 4) and ModelConfig.from_hf(grouped.to_hf()) == grouped
    assert c.topk_method == "greedy"


def test_mistral4_grouped_router_matches_transformers(tmp_path):
    m, d = make_hf(tmp_path, n_group=4, topk_group=1)
    ours = dsv3lab.load(d, dtype=torch.float32)
    assert ours.cfg.topk_method == "group_top2"
    x = torch.randint(0, 160, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x).logits
        assert (ours(x) - ref).abs().max().item() < 1e-5
        # the groups matter here: routing over all experts differs
        object.__setattr__(ours.cfg, "topk_method", "greedy")
        assert (ours(x) - ref).abs().max().item() > 1e-4


def test_mistral4_ranked_load_reads_the_fused_experts(tmp_path):
    """``parallel.load_sharded`` of a transformers-written checkpoint (experts stored fused): each
    rank of TP2 x EP2 holds its slices of the same weights as the whole model."""
    from dsv3lab.parallel import Layout, load_sharded
    _, d = make_hf(tmp_path)
    whole = dsv3lab.load(d, dtype=torch.float32)
    full = dict(whole.named_parameters())
    for rank in (0, 1):
        part = load_sharded(d, Layout(tp=2, ep=2), rank=rank, dtype=torch.float32)
        n_experts = 0
        for name, p in part.named_parameters():
            ref = full[name]
            dims = [i for i, (a, b) in enumerate(zip(p.shape, ref.shape)) if a != b]
            if dims:                                    # a tensor-parallel slice: this rank's rows or columns
                i = dims[0]
                ref = ref.narrow(i, rank * p.shape[i], p.shape[i])
            assert torch.equal(p, ref), name
            n_experts += ".experts." in name
        assert n_experts == 3 * (whole.cfg.num_hidden_layers - whole.cfg.first_k_dense_replace) * whole.cfg.n_routed_experts // 2
