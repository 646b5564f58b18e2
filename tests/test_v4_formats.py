"""DeepSeek-V4 checkpoint formats: the official key layout (written by ``save_v4``, read back by
``dsv3lab.load`` and by transformers' own conversion map), FP8 with UE8M0 scales, MXFP4 experts."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.checkpoint import CheckpointError
from dsv3lab.checkpoint.v4 import module_name, official_key, save_v4
from dsv3lab.fp8 import is_pow2, weight_dequant
from dsv3lab.mxfp4 import E2M1, mxfp4_dequant, mxfp4_quant


def tiny(seed=0):
    m = dsv3lab.build("v4-tiny", seed=seed)
    with torch.no_grad():                      # no constant parameters: a lost one would show
        for n, p in m.named_parameters():
            if p.dim() == 1 or "position_bias" in n:
                p.normal_(0, 0.5)
    return m


def test_official_keys_round_trip_through_the_adapter():
    cfg = dsv3lab.build("v4-tiny", device="meta").cfg
    m = dsv3lab.build(cfg.replace(num_nextn_predict_layers=1, mtp_layer_types=("compressed_sparse_attention",)),
                      device="meta")
    names = [n for n, _ in list(m.named_parameters()) + list(m.named_buffers())]
    keys = {official_key(n) for n in names}
    assert len(keys) == len(names)
    for n in names:
        assert module_name(official_key(n)) == n
    for k in ("embed.weight", "head.weight", "hc_head_fn", "layers.1.attn.wq_a.weight", "layers.1.attn.attn_sink",
              "layers.1.attn.compressor.ape", "layers.1.attn.indexer.compressor.wkv.weight",
              "layers.1.attn.indexer.wq_b.weight", "layers.2.ffn.experts.3.w1.weight", "layers.0.ffn.gate.tid2eid",
              "layers.1.ffn.gate.bias", "layers.0.hc_attn_fn", "layers.0.attn_norm.weight"):
        assert k in keys, k
    # the MTP block: a main block's names under mtp.K, plus its own (the release's names)
    for k in ("mtp.0.attn.wq_a.weight", "mtp.0.attn.indexer.compressor.ape", "mtp.0.ffn.experts.7.w2.weight",
              "mtp.0.ffn.gate.bias", "mtp.0.hc_ffn_scale", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight",
              "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.norm.weight", "mtp.0.hc_head_fn",
              "mtp.0.hc_head_base", "mtp.0.hc_head_scale"):
        assert k in keys, k
    assert "mtp.0.ffn.gate.tid2eid" not in keys                  # learned gate, never hash
    assert module_name("mtp.0.attn.wq_a.weight") == "mtp.0.self_attn.q_a_proj.weight"


def test_official_layout_loads_here_and_in_transformers(tmp_path):
    m = tiny()
    d = save_v4(m, tmp_path / "official")
    back = dsv3lab.load(d)
    x = torch.randint(0, 512, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    tr = pytest.importorskip("transformers")
    hf = tr.DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        err = (hf(x).logits - m(x)).abs().max().item()
    assert err < 1e-5, err


def test_resave_replaces_the_directory_whole_and_keeps_other_files(tmp_path):
    a, b = tiny(seed=1), tiny(seed=2)
    d = save_v4(a, tmp_path / "ck", fp8=True)
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    save_v4(b, d)                                           # bf16/fp32 now: no .scale tensors left
    assert sorted(os.listdir(tmp_path)) == ["ck"]           # no temporary directory beside it
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert not any(k.endswith(".scale") for k in load_file(os.path.join(d, "model.safetensors")))
    assert "quantization_config" not in json.load(open(os.path.join(d, "config.json")))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(os.path.join(d, "model.safetensors")).st_mode & 0o777 == 0o666 & ~umask
    x = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(dsv3lab.load(d)(x), b(x))


def test_fp8_ue8m0_and_fp4_experts_round_trip(tmp_path):
    m = tiny()
    cfg = m.cfg.replace(fp8_block_size=128, scale_fmt="ue8m0")
    m.cfg = cfg
    d = save_v4(m, tmp_path / "q", fp8=True, fp4_experts=True)
    c = json.loads(open(os.path.join(d, "config.json")).read())
    assert c["quantization_config"]["expert_dtype"] == "fp4" and c["quantization_config"]["scale_fmt"] == "ue8m0"
    t = load_file(os.path.join(d, "model.safetensors"))
    w1, s1 = t["layers.1.ffn.experts.0.w1.weight"], t["layers.1.ffn.experts.0.w1.scale"]
    assert w1.dtype == torch.uint8 and tuple(w1.shape) == (32, 32) and tuple(s1.shape) == (32, 2)
    wq, sq = t["layers.1.attn.wq_a.weight"], t["layers.1.attn.wq_a.scale"]
    assert wq.dtype == torch.float8_e4m3fn and is_pow2(sq).all()
    assert t["layers.1.attn.compressor.wkv.weight"].dtype == torch.bfloat16        # pools stay BF16
    assert t["layers.1.attn.attn_sink"].dtype == torch.float32
    back = dsv3lab.load(d, dtype=torch.float32)
    assert back.cfg.expert_dtype == "fp4"
    got = back.layers[1].mlp.experts[0].gate_proj.weight
    assert torch.equal(got, mxfp4_dequant(w1, s1, (32, 64)))
    assert torch.equal(back.layers[1].self_attn.q_a_proj.weight, weight_dequant(wq, sq, 128, torch.float32))
    x = torch.randint(0, 512, (1, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rel = ((back(x) - m(x)).abs().max() / m(x).abs().max()).item()
    assert rel < 0.2, rel                       # FP4 experts: close, not equal
    # a scale that is not a power of two under ue8m0 is named
    t["layers.1.attn.wq_a.scale"] = sq * 1.5
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wq_a\.scale.*not powers of two"):
        dsv3lab.load(d)


def test_mxfp4_codes_scales_and_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g) * torch.logspace(-3, 2, 64)
    q, s = mxfp4_quant(w)
    assert q.dtype == torch.uint8 and q.shape == (8, 32) and s.shape == (8, 2) and is_pow2(s).all()
    back = mxfp4_dequant(q, s, (8, 64))
    blocks = back.view(8, 2, 32) / s[..., None]
    assert torch.isin(blocks.abs(), E2M1).all()                     # every value on the e2m1 grid
    assert (w.view(8, 2, 32).abs().amax(-1) <= 6 * s).all()        # no value clipped
    # nearest grid point: the error is at most half the local spacing (0.5 below 2, 1 up to 4, 2 above)
    y = (w.view(8, 2, 32) / s[..., None]).abs()
    half = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
    assert ((blocks.abs() - y).abs() <= half + 1e-6).all()
    exact = torch.tensor([[0.5, -1.0, 1.5, 6.0] * 8])
    q, s = mxfp4_quant(exact)
    assert torch.equal(mxfp4_dequant(q, s, (1, 32)), exact)
    # the signed int8 form the release may use reads the same
    assert torch.equal(mxfp4_dequant(q.view(torch.int8), s, (1, 32)), exact)
