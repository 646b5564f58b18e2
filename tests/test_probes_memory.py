"""Latent-KV memory accounting (issue 4): analytic bytes vs live cache buffers
(ISCA '25 Table 1; docs/references.md#kv-bytes)."""

import pytest
import torch

import dsv3lab
from dsv3lab.config import ModelConfig
from dsv3lab.probes import memory


def test_v3_671b_analytic_on_meta():
    from dsv3lab.model.mla import MLA
    cfg = ModelConfig.preset("v3-671b")
    attn = MLA(cfg, device="meta")                             # one layer of the 671B model, no memory
    per_layer = attn.c + attn.r                               # what the absorbed cache stores
    assert cfg.num_hidden_layers * per_layer * 2 == 70_272
    assert memory.bytes_per_token(cfg) == 70_272 == dsv3lab.kv_cache_bytes_per_token(cfg)
    assert memory.bytes_per_token(cfg, layout="naive") == 4_997_120
    assert memory.bytes_per_token("v2-236b") == 69_120
    assert memory.bytes_per_token("v2-lite-16b") == 31_104
    assert memory.bytes_per_token(cfg, dtype=torch.float8_e4m3fn) == 35_136
    rows = {r["layout"]: r for r in memory.layout_table(cfg)}
    assert rows["absorbed"]["values_per_layer"] == 576 and rows["naive"]["values_per_layer"] == 40_960
    assert rows["mha"]["values_per_layer"] == 32_768 and rows["gqa-8"]["values_per_layer"] == 2_048
    assert rows["mqa"]["values_per_layer"] == 256


@pytest.mark.parametrize("name", ModelConfig.presets())
@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_measured_cache_bytes_equal_analytic(name, mode):
    cfg = ModelConfig.preset(name)
    max_len = 2 if mode == "naive" and cfg.num_attention_heads > 32 else 4
    got = memory.measured_bytes_per_token(cfg, mode=mode, dtype=torch.bfloat16, batch=1, max_len=max_len)
    assert got == memory.bytes_per_token(cfg, torch.bfloat16, mode, include_mtp=True)
    got = memory.measured_bytes_per_token(cfg, mode=mode, dtype=torch.bfloat16, batch=1, max_len=max_len,
                                          include_mtp=False)
    assert got == memory.bytes_per_token(cfg, torch.bfloat16, mode)


def test_measured_from_live_model_cache():
    model = dsv3lab.build("tiny", seed=0)
    for mode in ("absorbed", "naive"):
        for dtype in (torch.float32, torch.bfloat16):
            got = memory.measured_bytes_per_token(model, mode=mode, dtype=dtype, batch=3, max_len=16)
            assert got == memory.bytes_per_token(model.cfg, dtype, mode, include_mtp=True)
    assert model.attn_mode == "absorbed"
    # the live cache after a real prefill holds exactly what the hook says is cached
    cache = model.new_cache(1, 8)
    from dsv3lab.probes import run_with_cache
    tok = torch.randint(0, 512, (1, 5))
    _, acts = run_with_cache(model, tok, ["layers.0.self_attn.hook_kv_latent", "layers.0.self_attn.hook_k_pe"],
                             cache=cache)
    c = model.cfg.kv_lora_rank
    assert torch.equal(cache.layers[0][0, :5, :c], acts["layers.0.self_attn.hook_kv_latent"][0])
    assert torch.equal(cache.layers[0][0, :5, c:], acts["layers.0.self_attn.hook_k_pe"][0])


def test_every_registered_attention_mode_is_counted_by_its_own_cache():
    """The config path asks the seam's registry for the cache class, so it counts what the model
    allocates for every variant (a new one included), and an unknown mode is refused by name."""
    from dsv3lab.model.mla import ATTENTION
    cfg = ModelConfig.preset("tiny").replace(index_n_heads=2, index_head_dim=16, index_topk=4)
    model = dsv3lab.build(cfg, seed=0)                        # has an indexer: every mode applies
    for mode in ATTENTION:
        from_model = memory.measured_bytes_per_token(model, mode=mode, dtype=torch.bfloat16, batch=2, max_len=8)
        from_cfg = memory.measured_bytes_per_token(model.cfg, mode=mode, dtype=torch.bfloat16, batch=2, max_len=8)
        assert from_cfg == from_model > 0, mode
    assert memory.measured_bytes_per_token(model.cfg, mode="sparse") > memory.measured_bytes_per_token(
        model.cfg, mode="absorbed")                           # the indexer's keys are counted
    with pytest.raises(ValueError, match="attn_mode must be one of .*'windowed'"):
        memory.measured_bytes_per_token(model.cfg, mode="windowed")


def test_report_comparison_facts_c9():
    rows = {r["model"]: r for r in memory.kv_comparison()}
    assert rows["DeepSeek-V3"]["bytes_per_token"] == 70_272
    assert rows["Qwen-2.5 72B"]["bytes_per_token"] == 327_680
    assert rows["LLaMA-3.1 405B"]["bytes_per_token"] == 516_096
    assert rows["Qwen-2.5 72B"]["printed"] == "4.66x" and abs(rows["Qwen-2.5 72B"]["ratio"] - 4.663) < 1e-3
    assert rows["LLaMA-3.1 405B"]["printed"] == "7.28x" and abs(rows["LLaMA-3.1 405B"]["ratio"] - 7.344) < 1e-3


def test_capacity():
    cap = memory.capacity("v3-671b", 70_272 * 10_000, context=1000)
    assert cap["tokens"] == 10_000 and cap["requests"] == 10 and cap["concurrency"] == 10.0
    naive = memory.capacity("v3-671b", 70_272 * 10_000, layout="naive", context=1000)
    assert naive["tokens"] == 70_272 * 10_000 // 4_997_120
