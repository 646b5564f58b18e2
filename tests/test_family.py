"""The DeepSeek-V3 family beyond V3: Kimi-K2- and Moonlight-style checkpoints load to
transformers' logits; V3.1's ue8m0 scale format on save and load; V3.2's config and indexer keys.

Parity follows tests/test_parity.py: a random small config saved by transformers'
DeepseekV3ForCausalLM (fp32, eager), loaded by dsv3lab.load; routing (top-k sets per token per
MoE layer) must be identical before logits are compared within 1e-4 relative.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.checkpoint import CheckpointError, hf_key, is_fp32_key, is_fp8_key, module_key
from dsv3lab.config import ModelConfig
from dsv3lab.fp8 import is_pow2, weight_dequant

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from hf_reference import roughen, save_eager  # noqa: E402
from test_parity import hf_routing, our_routing  # noqa: E402

SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
             num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
             initializer_range=0.05, num_nextn_predict_layers=0)

FAMILY = {
    # Kimi K2's shapes at toy width: its 384 experts in ONE group (n_group = topk_group = 1), top-8,
    # one dense layer, rope_theta 50000 with YaRN's beta_fast = beta_slow = 1, routed scale 2.827;
    # its config.json says model_type "kimi_k2"
    "kimi-k2-style": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=384,
                          num_experts_per_tok=8, n_group=1, topk_group=1, n_shared_experts=1,
                          routed_scaling_factor=2.827, q_lora_rank=48, rope_theta=50000.0,
                          rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=16,
                                            beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                          model_type="kimi_k2"),
    # Moonlight-16B-A3B's shapes: no q low rank (q_proj), 2 shared experts, top-6 of 64 in one
    # group, plain RoPE at theta 50000, routed scale 2.446
    "moonlight-style": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=64,
                            num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2,
                            routed_scaling_factor=2.446, q_lora_rank=None, rope_theta=50000.0,
                            rope_scaling=None, model_type="deepseek_v3"),
}


def make_hf(tmp_path, case, seed=0):
    torch.manual_seed(seed)
    kw = dict(SMALL, **FAMILY[case])
    rs, model_type = kw.pop("rope_scaling"), kw.pop("model_type")
    cfg = DeepseekV3Config(num_key_value_heads=kw["num_attention_heads"], rope_scaling=rs, **kw)
    cfg._attn_implementation = "eager"
    m = DeepseekV3ForCausalLM(cfg).float().eval()
    roughen(m, cfg)
    d = tmp_path / case
    save_eager(m, d)
    if model_type != "deepseek_v3":
        c = json.loads((d / "config.json").read_text())
        c["model_type"] = model_type            # what moonshotai ships; architectures stay V3's
        assert c["architectures"] == ["DeepseekV3ForCausalLM"]
        (d / "config.json").write_text(json.dumps(c))
    return m, d


@pytest.mark.parametrize("case", list(FAMILY))
def test_family_checkpoint_matches_transformers(tmp_path, case):
    m, d = make_hf(tmp_path, case)
    ours = dsv3lab.load(d, dtype=torch.float32)
    cfg = ours.cfg
    assert cfg.n_group == 1 and cfg.n_routed_experts == FAMILY[case]["n_routed_experts"]
    assert cfg.q_lora_rank == (FAMILY[case]["q_lora_rank"] or 0)
    # the bias exists whatever the hidden size (the official demo creates it only at 7168)
    assert all(layer.mlp.gate.e_score_correction_bias is not None for layer in ours.layers[1:])
    x = torch.randint(0, SMALL["vocab_size"], (3, 29), generator=torch.Generator().manual_seed(1))
    ref, ref_ids = hf_routing(m, x)
    got, got_ids = our_routing(ours, x)
    assert len(ref_ids) == len(got_ids) == 2
    for a, b in zip(ref_ids, got_ids):
        assert torch.equal(a, b), "routing decisions differ from transformers"
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"max relative logit error {rel:.2e}"


# --- ue8m0 ------------------------------------------------------------------------------------

UE8M0 = ModelConfig.preset("tiny").replace(name="tiny-ue8m0", fp8_block_size=128, scale_fmt="ue8m0",
                                           hidden_size=160, intermediate_size=200, q_lora_rank=136)


def test_ue8m0_save_writes_power_of_two_scales_and_loads(tmp_path):
    m = dsv3lab.build(UE8M0, seed=0)
    d = dsv3lab.save(m, tmp_path / "ck", fp8=True)
    qc = json.loads(open(os.path.join(d, "config.json")).read())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [128, 128]
    assert ModelConfig.from_hf(d).scale_fmt == "ue8m0"
    tensors = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d, f)))
    sd = {hf_key(UE8M0, k): v for k, v in m.state_dict().items()}
    scales = {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}
    assert len(scales) > 20
    for k, s in scales.items():
        w = sd[k[:-len("_scale_inv")]].float()
        assert is_pow2(s).all(), k
        # each block's scale is the smallest power of two >= amax/448 (rounded up: no overflow)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                amax = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].abs().max().item()
                assert s[i, j].item() >= amax / 448 > s[i, j].item() / 2, (k, i, j)
    back = dsv3lab.load(d, dtype=torch.float32)
    assert back.cfg.scale_fmt == "ue8m0"
    # loaded weights are the file's e4m3 times its scales, exactly (data)
    k = "model.layers.0.self_attn.q_b_proj.weight"
    assert torch.equal(back.layers[0].self_attn.q_b_proj.weight,
                       weight_dequant(tensors[k], tensors[k + "_scale_inv"], 128, torch.float32))


def test_ue8m0_checkpoint_with_a_non_power_of_two_scale_is_named(tmp_path):
    m = dsv3lab.build(UE8M0, seed=0)
    d = dsv3lab.save(m, tmp_path / "ck", fp8=True)
    (f,) = [p for p in os.listdir(d) if p.endswith(".safetensors")]
    t = load_file(os.path.join(d, f))
    key = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    t[key] = t[key] * 1.5
    save_file(t, os.path.join(d, f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv.*not powers of two.*ue8m0"):
        dsv3lab.load(d)
    # the same file read as a plain FP8 checkpoint is valid: the format is the config's promise
    c = json.loads(open(os.path.join(d, "config.json")).read())
    del c["quantization_config"]["scale_fmt"]
    open(os.path.join(d, "config.json"), "w").write(json.dumps(c))
    dsv3lab.load(d)


# --- V3.2 config and keys ---------------------------------------------------------------------

def test_v32_config_reads_and_writes_the_indexer_fields():
    from transformers import DeepseekV32Config
    hf = DeepseekV32Config(**{k: v for k, v in SMALL.items() if k != "num_nextn_predict_layers"},
                           num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=16,
                           num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=48,
                           index_n_heads=4, index_head_dim=16, index_topk=8).to_dict()
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (4, 16, 8) and cfg.has_indexer
    out = cfg.to_hf()
    assert out["model_type"] == "deepseek_v32" and out["architectures"] == ["DeepseekV32ForCausalLM"]
    assert ModelConfig.from_hf(out) == cfg
    v32 = ModelConfig.preset("v3.2-671b")
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
    assert v32.scale_fmt == "ue8m0" and v32.max_position_embeddings == 163840
    assert "index_topk" not in ModelConfig.preset("v3-671b").to_hf()


def test_indexer_keys_through_the_adapter():
    """transformers' DeepseekV32 names for the indexer map to our module names unchanged, with
    the official dtypes: wq_b and wk FP8 with scales, weights_proj fp32, k_norm (weight + bias)
    unquantized."""
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
    hf = DeepseekV32Config(**{k: v for k, v in SMALL.items() if k != "num_nextn_predict_layers"},
                           num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=16,
                           num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=48,
                           index_n_heads=4, index_head_dim=16, index_topk=8)
    with torch.device("meta"):
        names = [n for n, _ in DeepseekV32ForCausalLM(hf).named_parameters() if ".indexer." in n]
    cfg = ModelConfig.from_hf(hf.to_dict())
    want = {f"model.layers.{i}.self_attn.indexer.{s}" for i in range(2)
            for s in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")}
    assert set(names) == want
    for k in names:
        name = module_key(cfg, k)
        assert name == k[len("model."):] and hf_key(cfg, name) == k
        suffix = k.split(".indexer.")[1]
        assert is_fp8_key(k) == (suffix in ("wq_b.weight", "wk.weight")), k
        assert is_fp32_key(k) == (suffix == "weights_proj.weight"), k
    assert "indexer.weights_proj" in DeepseekV32ForCausalLM._keep_in_fp32_modules
