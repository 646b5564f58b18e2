import json

import pytest

from dsv3lab.config import ConfigError, ModelConfig
from dsv3lab.model.rope import inv_freq


def test_official_presets():
    v3 = ModelConfig.preset("v3-671b")
    assert (v3.vocab_size, v3.hidden_size, v3.intermediate_size, v3.moe_intermediate_size) == (129280, 7168, 18432, 2048)
    assert (v3.num_hidden_layers, v3.first_k_dense_replace, v3.num_attention_heads) == (61, 3, 128)
    assert (v3.n_routed_experts, v3.n_shared_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 1, 8, 8, 4)
    assert v3.scoring_func == "sigmoid" and v3.routed_scaling_factor == 2.5 and v3.q_lora_rank == 1536
    v2 = ModelConfig.preset("v2-236b")
    assert (v2.hidden_size, v2.num_hidden_layers, v2.n_routed_experts, v2.n_group, v2.topk_group) == (5120, 60, 160, 8, 3)
    assert v2.scoring_func == "softmax" and v2.routed_scaling_factor == 16.0
    lite = ModelConfig.preset("v2-lite-16b")
    assert lite.q_lora_rank == 0 and lite.num_attention_heads == 16 and lite.n_routed_experts == 64
    for name in ("v3-671b", "v2-236b", "v2-lite-16b"):
        c = ModelConfig.preset(name)
        assert (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (512, 128, 64, 128)


@pytest.mark.parametrize("name", ["tiny", "lab"])
def test_lab_presets_keep_every_v3_feature(name):
    c = ModelConfig.preset(name)
    assert c.scoring_func == "sigmoid" and c.topk_method == "noaux_tc"
    assert c.n_group > 1 and c.topk_group < c.n_group
    assert c.q_lora_rank > 0 and c.kv_lora_rank > 0
    assert 0 < c.first_k_dense_replace < c.num_hidden_layers
    assert c.n_shared_experts >= 1 and c.num_nextn_predict_layers >= 1 and c.yarn is not None


def test_softmax_scale_matches_hand_computation():
    # 192^-0.5 * m^2, m = 0.1 * mscale_all_dim * ln(40) + 1   (report sec. 4.3; docs/references.md#softmax-scale)
    assert ModelConfig.preset("v3-671b").softmax_scale == pytest.approx(0.1352338, abs=5e-8)
    assert ModelConfig.preset("v2-lite-16b").softmax_scale == pytest.approx(0.1147214, abs=5e-8)
    assert ModelConfig.preset("v3-671b").replace(rope_scaling=None).softmax_scale == pytest.approx(0.0721688, abs=5e-8)


def test_yarn_ramp_v3():
    # d=64, L=4096, s=40: c(32) = 10.47 -> low 10, c(1) = 22.51 -> high 23
    cfg = ModelConfig.preset("v3-671b")
    f, amp = inv_freq(cfg)
    base = 1.0 / (10000 ** (2 * __import__("torch").arange(32).double() / 64))
    assert amp == 1.0
    for i in range(32):
        if i <= 10:
            assert f[i].item() == pytest.approx(base[i].item(), rel=1e-6)
        elif i >= 23:
            assert f[i].item() == pytest.approx(base[i].item() / 40, rel=1e-6)
        else:
            ramp = (i - 10) / 13
            assert f[i].item() == pytest.approx(base[i].item() * (1 - ramp) + base[i].item() / 40 * ramp, rel=1e-6)


def test_hf_round_trip_v3(tmp_path):
    c = ModelConfig.preset("v3-671b")
    d = c.to_hf()
    assert d["model_type"] == "deepseek_v3" and d["quantization_config"]["weight_block_size"] == [128, 128]
    assert d["rope_scaling"]["factor"] == 40.0
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = ModelConfig.from_hf(tmp_path)
    assert back.replace(name=c.name) == c


def test_from_hf_v2_style_and_rope_parameters():
    d = ModelConfig.preset("v2-lite-16b").to_hf()
    d.update(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax", topk_method="greedy")
    d["rope_parameters"] = dict(d.pop("rope_scaling"), rope_type="yarn", rope_theta=10000.0)
    d["rope_parameters"].pop("type")
    c = ModelConfig.from_hf(d)
    assert c.q_lora_rank == 0 and c.scoring_func == "softmax" and c.yarn["mscale_all_dim"] == 0.707


def test_bad_configs_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf({"model_type": "llama"})
    with pytest.raises(ConfigError, match="n_group"):
        ModelConfig.preset("tiny").replace(n_group=3)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        ModelConfig.preset("tiny").replace(num_experts_per_tok=99)
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.preset("tiny").replace(topk_group=1, num_experts_per_tok=8)
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig.preset("tiny").replace(scoring_func="relu")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("v4")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_hf(tmp_path)
    d = ModelConfig.preset("tiny").to_hf()
    d["quantization_config"] = {"quant_method": "gptq"}
    with pytest.raises(ConfigError, match="quant_method"):
        ModelConfig.from_hf(d)


def test_family_presets():
    k2 = ModelConfig.preset("kimi-k2")
    assert (k2.n_routed_experts, k2.num_experts_per_tok, k2.n_group, k2.topk_group) == (384, 8, 1, 1)
    assert (k2.num_attention_heads, k2.first_k_dense_replace, k2.routed_scaling_factor) == (64, 1, 2.827)
    assert k2.rope_theta == 50000.0 and k2.vocab_size == 163840 and k2.q_lora_rank == 1536
    ml = ModelConfig.preset("moonlight-16b")
    assert (ml.hidden_size, ml.num_hidden_layers, ml.first_k_dense_replace) == (2048, 27, 1)
    assert (ml.n_routed_experts, ml.n_shared_experts, ml.num_experts_per_tok, ml.n_group) == (64, 2, 6, 1)
    assert ml.q_lora_rank == 0 and ml.moe_intermediate_size == 1408 and ml.routed_scaling_factor == 2.446
    assert ModelConfig.preset("v3.1-671b") == ModelConfig.preset("v3-671b").replace(name="v3.1-671b",
                                                                                     scale_fmt="ue8m0")


def test_kimi_k2_config_json_reads_as_v3_architecture():
    d = ModelConfig.preset("kimi-k2").to_hf()
    d.update(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"])
    c = ModelConfig.from_hf(d)
    assert c.replace(name="kimi-k2") == ModelConfig.preset("kimi-k2")
    assert c.to_hf()["model_type"] == "deepseek_v3"      # written under the name transformers loads


def test_v31_scale_fmt_round_trips():
    d = ModelConfig.preset("v3.1-671b").to_hf()
    assert d["quantization_config"]["scale_fmt"] == "ue8m0"
    assert ModelConfig.from_hf(d).scale_fmt == "ue8m0"
    d["quantization_config"]["scale_fmt"] = "e5m2"
    with pytest.raises(ConfigError, match="scale_fmt"):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize("name", ModelConfig.presets())
def test_info_and_plan_work_on_every_preset(name, capsys):
    from dsv3lab.cli import main
    cfg = ModelConfig.preset(name)
    assert main(["info", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] >= info["activated_params"] > 0
    # the largest of 16/8/4/2/1 ranks that divides the heads and the experts
    gpus = next(g for g in (16, 8, 4, 2, 1) if cfg.num_attention_heads % g == 0 and cfg.n_routed_experts % g == 0)
    assert main(["plan", name, "--gpus", str(gpus), "--gpu-mem-gb", "141", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["routed_experts_per_rank"] * plan["layout"]["ep"] == cfg.n_routed_experts
    assert plan["weight_bytes_per_rank"] > 0
    if name == "kimi-k2":            # 384 experts over 16 ranks: 24 per rank
        assert gpus == 16 and plan["routed_experts_per_rank"] == 24
