"""Checkpoints in the official HF layout: round trips, FP8, bad input, atomic writes.

What "exact" means here. Data read back is bit-exact: every tensor, key and dtype. A loaded
model's forward is asserted bit-equal to the built model's only together with the condition
that makes it a promise rather than luck: the two hold bit-identical weights in the same memory
layout (dtype, shape, strides, contiguous, 64-byte-aligned storage of their own), so the same
GEMM kernels run on the same operands (`assert_same_weights`). Arithmetic that may take another
kernel path (FP8 kept vs dequantized, the original vs an FP8 round trip) gets a stated tolerance.
"""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.checkpoint import CheckpointError, is_fp8_key
from dsv3lab.config import ConfigError, ModelConfig

# dims that are not multiples of 128 and larger than one block in places (padding semantics)
ODD = ModelConfig.preset("tiny").replace(
    name="odd", vocab_size=300, hidden_size=160, intermediate_size=200, moe_intermediate_size=72,
    num_attention_heads=2, q_lora_rank=136, kv_lora_rank=100, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)


def model_with_bias(cfg, seed=0):
    m = dsv3lab.build(cfg, seed=seed)
    with torch.no_grad():
        for layer in list(m.layers) + list(m.mtp):
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return m


def x_for(cfg, B=2, S=11):
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))


def assert_same_weights(a, b):
    """Bit-identical tensors in the same memory layout: the precondition for a bit-equal forward."""
    ta = dict(a.named_parameters()) | dict(a.named_buffers())
    tb = dict(b.named_parameters()) | dict(b.named_buffers())
    assert ta.keys() == tb.keys()
    for k in ta:
        x, y = ta[k], tb[k]
        assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride(), k
        assert x.is_contiguous() and y.is_contiguous(), k
        assert x.data_ptr() % 64 == 0 and y.data_ptr() % 64 == 0, f"{k}: storage not 64-byte aligned"
        assert torch.equal(x, y), k


def all_keys(d):
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    return idx


def test_round_trip_exact_and_official_keys(tmp_path):
    m = model_with_bias("tiny")
    d = dsv3lab.save(m, tmp_path / "ck", max_shard_bytes=200_000)
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    keys = all_keys(d)
    n = m.cfg.num_hidden_layers
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.experts.15.down_proj.weight",
              "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
              f"model.layers.{n}.eh_proj.weight", f"model.layers.{n}.enorm.weight", f"model.layers.{n}.hnorm.weight",
              f"model.layers.{n}.shared_head.norm.weight", f"model.layers.{n}.shared_head.head.weight",
              f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.self_attn.q_b_proj.weight"]:
        assert k in keys, k
    with safe_open(os.path.join(d, keys["model.layers.1.mlp.gate.e_score_correction_bias"]), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(d).st_mode & 0o777 == 0o777 & ~umask
    assert all(os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o666 & ~umask for f in os.listdir(d))
    back = dsv3lab.load(d)
    assert_same_weights(back, m)
    x = x_for(m.cfg)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
        h = m(x, return_hidden=True)[1]
        assert torch.equal(back.mtp_logits(h[:, :-1], x[:, 1:])[0], m.mtp_logits(h[:, :-1], x[:, 1:])[0])


def ref_dequant(q, s, b=128):
    """Independent block dequantization: loop over blocks."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = q[i * b:(i + 1) * b, j * b:(j + 1) * b].float() * s[i, j]
    return out


def test_fp8_checkpoint_format_and_twin(tmp_path):
    m = model_with_bias(ODD)
    d8 = dsv3lab.save(m, tmp_path / "fp8", fp8=True)
    cfg = json.load(open(os.path.join(d8, "config.json")))
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    tensors = {}
    for f in sorted(os.listdir(d8)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(d8, f)))
    n = ODD.num_hidden_layers
    kv_a = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape == (108, 160)
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)
    assert tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 2)     # [200, 160]
    for k in ["model.embed_tokens.weight", "lm_head.weight", f"model.layers.{n}.eh_proj.weight",
              "model.layers.1.mlp.gate.weight", "model.norm.weight"]:
        assert tensors[k].dtype != torch.float8_e4m3fn and k + "_scale_inv" not in tensors
        assert not is_fp8_key(k)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    # FP8 round trip within e4m3 rounding, for every FP8 weight: with block scale s, the
    # quantized value w/s is off by at most half an ulp: 2^-4 relative (3 mantissa bits) for
    # normals, 2^-10 absolute below 2^-6 (subnormals)
    sd = {dsv3lab.checkpoint.hf_key(ODD, k): v for k, v in m.state_dict().items()}
    n_fp8 = 0
    for k, q in tensors.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        sc = tensors[k + "_scale_inv"]
        w = sd[k].float()
        deq = ref_dequant(q, sc)
        s_full = sc.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
        bound = torch.maximum(w.abs() * 2 ** -4, s_full * 2 ** -10) * (1 + 1e-6)
        assert ((deq - w).abs() <= bound).all(), k
        n_fp8 += 1
    assert n_fp8 > 20
    # the dequantized twin, written by hand as a plain fp32 checkpoint
    twin = {}
    for k, t in tensors.items():
        if k.endswith("_scale_inv"):
            continue
        twin[k] = ref_dequant(t, tensors[k + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t.float()
    dt = tmp_path / "twin"
    dt.mkdir()
    save_file(twin, str(dt / "model.safetensors"), metadata={"format": "pt"})
    cfg.pop("quantization_config")
    (dt / "config.json").write_text(json.dumps(cfg))
    a = dsv3lab.load(d8, dtype=torch.float32)
    b = dsv3lab.load(dt, dtype=torch.float32)
    kept = dsv3lab.load(d8, dtype=torch.float32, fp8="keep")
    assert kept.layers[0].self_attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
    assert kept.layers[0].self_attn.q_b_proj.weight_scale_inv.shape == (1, 2)
    assert_same_weights(a, b)                 # dequantized on load == dequantized by hand, bit for bit
    x = x_for(ODD)
    with torch.no_grad():
        la, lb, lk, l0 = a(x), b(x), kept(x), m(x)
    assert torch.equal(la, lb)
    # kept FP8 dequantizes per call in the input's dtype: the same products, possibly another
    # GEMM blocking; fp32 reassociation over K <= 200 stays far below 1e-5
    torch.testing.assert_close(lk, la, rtol=1e-5, atol=1e-5)
    # and close to the original full-precision model (per-weight error is bounded above; the
    # logits of this random 3-layer model move by a few percent, routing flips included)
    assert ((la - l0).abs().mean() / l0.abs().mean()).item() < 0.15


def test_resave_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    m = model_with_bias("tiny", seed=1)
    d = dsv3lab.save(m, tmp_path / "ck", max_shard_bytes=300_000)
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    before = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    m2 = model_with_bias("tiny", seed=2)
    import safetensors.torch as st
    real = st.save_file
    calls = []

    def flaky(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        dsv3lab.save(m2, d, max_shard_bytes=300_000)
    monkeypatch.setattr(st, "save_file", real)
    after = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]          # no temporary directory left behind
    dsv3lab.save(m2, d)
    assert os.path.exists(os.path.join(d, "tokenizer.json"))
    x = x_for(m2.cfg)
    back = dsv3lab.load(d)
    assert_same_weights(back, m2)
    with torch.no_grad():
        assert torch.equal(back(x), m2(x))


@pytest.fixture
def ckpt(tmp_path):
    m = model_with_bias("tiny")
    d = dsv3lab.save(m, tmp_path / "ck")
    return tmp_path / "ck"


def _rewrite(d, fn):
    (f,) = [p for p in os.listdir(d) if p.endswith(".safetensors")]
    t = load_file(str(d / f))
    fn(t)
    save_file(t, str(d / f), metadata={"format": "pt"})
    idx = json.load(open(d / "model.safetensors.index.json"))
    idx["weight_map"] = {k: f for k in t}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return d / f


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        dsv3lab.load(ckpt)


def test_extra_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.rotary.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected.*rotary"):
        dsv3lab.load(ckpt)


def test_misshapen_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.1.self_attn.kv_b_proj.weight", torch.zeros(5, 7)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj\.weight.*\[5, 7\].*needs"):
        dsv3lab.load(ckpt)


def test_truncated_file(ckpt):
    (f,) = [p for p in os.listdir(ckpt) if p.endswith(".safetensors")]
    data = open(ckpt / f, "rb").read()
    open(ckpt / f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f.replace(".", r"\.")):
        dsv3lab.load(ckpt)


def test_not_a_safetensors_file(ckpt):
    (f,) = [p for p in os.listdir(ckpt) if p.endswith(".safetensors")]
    open(ckpt / f, "wb").write(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        dsv3lab.load(ckpt)


def test_index_names_missing_shard(ckpt):
    idx = json.load(open(ckpt / "model.safetensors.index.json"))
    idx["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="model-00009-of-00009"):
        dsv3lab.load(ckpt)


def test_unknown_model_type_and_inconsistent_config(ckpt):
    cfg = json.load(open(ckpt / "config.json"))
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="mixtral")))
    with pytest.raises(ConfigError, match="model_type"):
        dsv3lab.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, n_group=5)))
    with pytest.raises(ConfigError, match="n_group"):
        dsv3lab.load(ckpt)


def test_fp8_scale_problems(tmp_path):
    m = model_with_bias("tiny")
    d = tmp_path / "fp8"
    dsv3lab.save(m, d, fp8=True)
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight_scale_inv", torch.ones(3, 3)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv.*\[3, 3\]"):
        dsv3lab.load(d)
    _rewrite(d, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*no.*weight_scale_inv"):
        dsv3lab.load(d)


def test_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        dsv3lab.load(tmp_path / "nope")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps(ModelConfig.preset("tiny").to_hf()))
    with pytest.raises(CheckpointError, match="no \\*\\.safetensors"):
        dsv3lab.load(tmp_path / "e")


def test_checkpoint_without_mtp_loads_without_it(tmp_path):
    m = model_with_bias("tiny")
    d = dsv3lab.save(m, tmp_path / "ck")
    n = m.cfg.num_hidden_layers
    _rewrite(tmp_path / "ck", lambda t: [t.pop(k) for k in list(t) if k.startswith(f"model.layers.{n}.")])
    with pytest.warns(UserWarning, match="loading without MTP"):
        back = dsv3lab.load(d)
    assert len(back.mtp) == 0
    m.mtp = torch.nn.ModuleList()          # compare with the built model minus its MTP module
    assert_same_weights(back, m)
    x = x_for(m.cfg)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
