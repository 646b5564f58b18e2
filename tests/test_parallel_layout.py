"""Layouts are checked before any work; the planner counts exactly the meta tensors it places and
reproduces the report's and Day 6's deployment units (report sec. 3.4; docs/references.md#deployment)."""

import json
import subprocess
import sys

import pytest

import dsv3lab
from dsv3lab.config import ModelConfig
from dsv3lab.parallel import Layout, LayoutError, ParallelContext, apply_layout, check_fp8_blocks, plan
from dsv3lab.parallel.plan import place

TINY = ModelConfig.preset("tiny")      # H=4, V=512, dense 128, shared 32, E=16


@pytest.mark.parametrize("kw,field", [
    (dict(tp=3), "tp"),                       # world 3: 4 heads / 3
    (dict(tp=1, dp=3, ep=3), "ep"),           # 16 experts / 3
    (dict(tp=8), "tp"),                       # 4 heads / 8
])
def test_bad_layout_names_field(kw, field):
    world = kw.get("tp", 1) * kw.get("dp", 1)
    with pytest.raises(LayoutError, match=rf"Layout\.{field}:.*(heads|experts|vocab)"):
        Layout.make(world, **kw).validate(TINY)


def test_bad_world():
    with pytest.raises(LayoutError, match="world_size=4"):
        Layout(tp=2, dp=1).check_world(4)
    with pytest.raises(LayoutError, match="Layout.ep=3: does not divide world_size=4"):
        Layout(tp=4, ep=3).check_world(4)
    with pytest.raises(LayoutError, match="Layout.tp=3: does not divide"):
        Layout.make(4, tp=3)
    with pytest.raises(LayoutError, match="moe_comm"):
        Layout(moe_comm="nccl").check_world(1)
    with pytest.raises(LayoutError, match="world_size=1"):   # torch.distributed not joined: world of 1
        ParallelContext.init(Layout(tp=2))


def test_layout_defaults_and_coordinates():
    lay = Layout.make(8)
    assert (lay.tp, lay.dp, lay.ep) == (8, 1, 8)
    lay = Layout.make(8, dp=4)
    assert (lay.tp, lay.dp, lay.ep) == (2, 4, 8)
    assert lay.coords(5) == dict(rank=5, tp_rank=1, dp_rank=2, ep_rank=5, ep_group=0)
    assert list(Layout(tp=4, ep=2, dp=1).experts_of(1, 16)) == list(range(8, 16))
    v3 = ModelConfig.preset("v3-671b")
    assert check_fp8_blocks(v3, Layout(tp=8, ep=8)) == []
    assert check_fp8_blocks(TINY, Layout(tp=2, ep=2))   # toy widths are not 128-aligned


def test_virtual_placement_shapes():
    m = apply_layout(dsv3lab.build("tiny", device="meta"), Layout(tp=2, ep=4, dp=2), rank=3)
    attn = m.layers[0].self_attn
    assert attn.n_heads == 2 and attn.q_b_proj.weight.shape[0] == 2 * TINY.qk_head_dim
    assert attn.o_proj.weight.shape[1] == 2 * TINY.v_head_dim and attn.o_proj.shard == (1, 32, 64)
    assert m.embed_tokens.weight.shape == (256, 64) and m.embed_tokens.shard == (0, 256, 512)
    assert m.lm_head.weight.shape == (256, 64)
    experts = m.layers[1].mlp.experts
    assert [e for e in range(16) if experts[e] is not None] == [12, 13, 14, 15]
    assert m.layers[0].mlp.down_proj.weight.shape == (64, 64)
    # a second application is refused
    with pytest.raises(LayoutError, match="already sharded"):
        apply_layout(m, Layout(tp=2, ep=4, dp=2), rank=3)
    # real weights cannot be sharded without process groups
    with pytest.raises(LayoutError, match="virtual"):
        apply_layout(dsv3lab.build("tiny"), Layout(tp=2, ep=2), rank=0)


@pytest.mark.parametrize("kw", [dict(gpus=4, tp=2, dp=2, ep=4), dict(gpus=2, tp=1, dp=2, ep=2, redundant_experts=2)])
def test_plan_counts_the_tensors_it_places(kw):
    p = plan("lab", gpu_mem_gb=1, return_model=True, **kw)
    m = p.pop("_model")
    tensors = {id(t): t for t in list(m.parameters()) + list(m.buffers())}.values()
    assert p["weight_bytes_per_rank"] == p["weight_bytes_per_rank_fp8"] == sum(t.numel() * t.element_size()
                                                                               for t in tensors)
    fresh = place(ModelConfig.preset("lab"), Layout.make(kw["gpus"], tp=kw["tp"], dp=kw["dp"], ep=kw["ep"]),
                  redundant_experts=kw.get("redundant_experts", 0))
    assert p["weight_bytes_per_rank_bf16"] == sum(t.numel() * t.element_size()
                                                  for t in list(fresh.parameters()) + list(fresh.buffers()))
    lab = ModelConfig.preset("lab")
    assert p["routed_experts_per_rank"] == (lab.n_routed_experts + kw.get("redundant_experts", 0)) // kw["ep"]
    # KV: latent cache bytes/token over all layers (+ MTP), capacity from what is left
    kv = dsv3lab.kv_cache_bytes_per_token(lab, include_mtp=True)
    assert p["kv_cache_tokens_per_rank"] == int((0.9e9 - p["weight_bytes_per_rank"]) // kv)


def test_plan_v3_on_one_h200_node():
    """docs/references.md#fp8-blocks: 688.6 GB of FP8 checkpoint over 8 x H200 (141 GB) fits; BF16 does not."""
    p = plan("v3-671b", gpus=8, gpu_mem_gb=141, context=4096)
    assert p["layout"] == dict(tp=8, ep=8, dp=1, world_size=8)
    assert p["routed_experts_per_rank"] == 32 and p["heads_per_rank"] == 16 and p["vocab_rows_per_rank"] == 16160
    # ~1/8 of the 688.6 GB checkpoint (less its MTP embedding/head copies, plus replicated q_a/kv_a/norms)
    assert 80e9 < p["weight_bytes_per_rank"] < 90e9
    assert p["fits"] and p["kv_cache_tokens_per_rank"] > 100_000
    assert p["kv_cache_bytes_per_token"] == 62 * 576 * 2           # 61 layers + MTP
    assert dsv3lab.kv_cache_bytes_per_token("v3-671b") == 70_272   # ISCA '25 Table 1, without MTP
    assert not plan("v3-671b", gpus=8, gpu_mem_gb=141, weights="bf16")["fits"]


@pytest.mark.slow
def test_plan_paper_and_day6_units():
    """Report sec. 3.4: paper prefill (32 GPUs, TP4 DP8 EP32, 32 redundant: 9 experts/GPU) and decode (320 GPUs,
    EP320: 1 expert/GPU); Day-6 decode EP144 with 32 redundant: 2 routed experts/GPU. H800 = 80 GB."""
    pre = plan("v3-671b", gpus=32, gpu_mem_gb=80, tp=4, dp=8, ep=32, redundant_experts=32)
    assert pre["routed_experts_per_rank"] == 9 and pre["fits"]
    dec = plan("v3-671b", gpus=320, gpu_mem_gb=80, tp=4, dp=80, ep=320, redundant_experts=64)
    assert dec["routed_experts_per_rank"] == 1 and dec["fits"]
    assert dec["weight_bytes_per_rank"] < pre["weight_bytes_per_rank"] / 2
    d6 = plan("v3-671b", gpus=144, gpu_mem_gb=80, tp=1, dp=144, ep=144, redundant_experts=32)
    assert d6["routed_experts_per_rank"] == 2 and d6["fits"]
    # all-to-all per token per MoE layer: k * D * (dispatch + combine) * (ep-1)/ep
    assert dec["a2a_bytes_per_token_per_moe_layer"] == pytest.approx(8 * 7168 * 4 * 319 / 320)
    assert dec["a2a_bytes_per_token_per_moe_layer_fp8_dispatch"] == pytest.approx(8 * (7168 * 3 + 56 * 4) * 319 / 320)


def test_plan_cli_json():
    r = subprocess.run([sys.executable, "-m", "dsv3lab", "plan", "tiny", "--gpus", "2", "--gpu-mem-gb", "0.01",
                        "--tp", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert {"weight_bytes_per_rank", "kv_cache_tokens_per_rank", "fits"} <= set(p)
    r = subprocess.run([sys.executable, "-m", "dsv3lab", "plan", "tiny", "--gpus", "3", "--gpu-mem-gb", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Layout.tp" in r.stderr and "num_attention_heads=4" in r.stderr
