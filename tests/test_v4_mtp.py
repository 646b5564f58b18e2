"""DeepSeek-V4's multi-token-prediction (MTP) block, as the release ships it (``mtp.0.*``).

transformers 5.24 has no V4 MTP, so the reference is composed here from transformers' own V4
modules following the release's formula (docs/v4.md#mtp):

  X' = e_proj(enorm(embed(t_{i+1}))) (+ on every stream) h_proj(hnorm(X_i))
  logits = head(norm(hyper_head(decoder_layer(X'))))

with ``DeepseekV4DecoderLayer`` (layer index n of a transformers model of n + 1 layers, whose
first n are the main model and whose last has the MTP block's attention type and a learned gate),
``DeepseekV4RMSNorm``, ``DeepseekV4HyperHead`` and ``nn.Linear``. The lab loads the checkpoint
transformers wrote for that model, its layer n renamed ``mtp.0.*`` and the MTP block's own
tensors added under the release's names. Checked: logits of an MTP block of each attention type
(sliding, CSA m = 4, HCA at m' = 8: the lab's tiny rate, not the release's 128) in fp32 within
1e-5 (max abs, logits of size ~1); the checkpoint round trip, FP8 / UE8M0 and MXFP4 experts
included; named errors for an incomplete or mis-shaped MTP block; cached MTP decode equal to
the full forward; speculative greedy decoding equal to plain greedy decoding.
"""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.checkpoint import CheckpointError
from dsv3lab.checkpoint.v4 import save_v4
from dsv3lab.fp8 import is_pow2, weight_dequant
from dsv3lab.generate import generate_speculative
from dsv3lab.mxfp4 import mxfp4_dequant

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402
from transformers.masking_utils import create_sliding_window_causal_mask  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as M  # noqa: E402

MAIN = ["compressed_sparse_attention", "heavily_compressed_attention"]
SMALL = dict(vocab_size=160, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
             q_lora_rank=24, partial_rotary_factor=8 / 32, n_routed_experts=8, num_experts_per_tok=2,
             o_groups=2, o_lora_rank=16, index_n_heads=8, index_head_dim=16, index_topk=3, sliding_window=8,
             max_position_embeddings=512, initializer_range=0.05, hc_mult=2,
             compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
             rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
                                  beta_fast=32.0, beta_slow=1.0))
MTP_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]


def _roughen(params, g):
    """No constant parameter (norms 1, bases 0, sinks 0 ...): a lost one would show."""
    with torch.no_grad():
        for n, p in params:
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=g)
            elif p.dim() <= 1 or "position_bias" in n:
                p.normal_(0, 0.5, generator=g)


def make_reference(tmp_path, mtp_type, seed=0):
    """A transformers V4 of len(MAIN) + 1 layers (the last: the MTP block's decoder layer), the
    MTP extras as transformers modules, and the lab's checkpoint of the same weights."""
    torch.manual_seed(seed)
    n = len(MAIN)
    cfg = DeepseekV4Config(**SMALL, num_hidden_layers=n + 1, layer_types=MAIN + [mtp_type],
                           mlp_layer_types=["hash_moe"] + ["moe"] * n)
    cfg._attn_implementation = "eager"
    hf = DeepseekV4ForCausalLM(cfg).float().eval()
    hf.set_experts_implementation("eager")
    D = cfg.hidden_size
    extra = torch.nn.ModuleDict(dict(
        e_proj=torch.nn.Linear(D, D, bias=False), h_proj=torch.nn.Linear(D, D, bias=False),
        enorm=M.DeepseekV4RMSNorm(D, cfg.rms_norm_eps), hnorm=M.DeepseekV4RMSNorm(D, cfg.rms_norm_eps),
        norm=M.DeepseekV4RMSNorm(D, cfg.rms_norm_eps), hc_head=M.DeepseekV4HyperHead(cfg))).float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in extra.parameters():
            p.normal_(0, 0.05, generator=g)
        _roughen(list(hf.named_parameters()) + list(extra.named_parameters()), g)
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
                b.copy_(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3, generator=g)
    d = tmp_path / mtp_type
    hf.save_pretrained(d)
    # the release's layout: layer n is mtp.0, the MTP block's own tensors beside it; config.json
    # as the release lists it (n layers, one compress entry per layer and per MTP block)
    (f,) = glob.glob(os.path.join(d, "*.safetensors"))
    t = load_file(f)
    t = {(k.replace(f"model.layers.{n}.", "mtp.0.") if k.startswith(f"model.layers.{n}.") else k): v
         for k, v in t.items()}
    for name in ("e_proj", "h_proj", "enorm", "hnorm", "norm"):
        t[f"mtp.0.{name}.weight"] = extra[name].weight.detach().clone()
    for name in ("fn", "base", "scale"):
        t[f"mtp.0.hc_head_{name}"] = getattr(extra["hc_head"], f"hc_{name}").detach().clone()
    save_file(t, f, metadata={"format": "pt"})
    c = json.load(open(os.path.join(d, "config.json")))
    c.update(num_hidden_layers=n, mlp_layer_types=c["mlp_layer_types"][:n], num_nextn_predict_layers=1)
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
    return hf, extra, d


def reference_mtp_logits(hf, extra, x):
    """Main logits [B,S,V] and MTP logits [B,S-1,V] (position i: streams at i, token i+1),
    composed from transformers' modules."""
    n = len(MAIN)
    captured = {}
    h = hf.model.layers[n - 1].register_forward_hook(lambda _m, _i, o: captured.setdefault("X", o))
    try:
        with torch.no_grad():
            hf(x)
    finally:
        h.remove()
    X, nxt = captured["X"][:, :-1], x[:, 1:]
    with torch.no_grad():
        main = hf.lm_head(hf.model.norm(hf.model.hc_head(captured["X"])))
        e = extra["enorm"](hf.model.embed_tokens(nxt))
        y = extra["e_proj"](e).unsqueeze(2) + extra["h_proj"](extra["hnorm"](X))
        pos = torch.arange(nxt.shape[1])[None]
        emb = hf.model.embed_tokens(nxt)
        mask = create_sliding_window_causal_mask(config=hf.config, inputs_embeds=emb, attention_mask=None,
                                                 cache=None, position_ids=pos)
        rope = {k: hf.model.rotary_emb(emb, position_ids=pos, layer_type=k) for k in ("main", "compress")}
        y = hf.model.layers[n](y, position_embeddings=rope, position_ids=pos, attention_mask=mask,
                               input_ids=nxt, cache=None)
        return main, hf.lm_head(extra["norm"](extra["hc_head"](y)))


@pytest.mark.parametrize("mtp_type", MTP_TYPES)
def test_mtp_logits_match_the_reference_composed_from_transformers(tmp_path, mtp_type):
    hf, extra, d = make_reference(tmp_path, mtp_type)
    ours = dsv3lab.load(d, dtype=torch.float32)
    assert ours.cfg.mtp_layer_types == (mtp_type,) and len(ours.mtp) == 1 and ours.unused_mtp == []
    assert not ours.mtp[0].mlp.gate.hashed                 # layer id n: a learned gate, never hash
    x = torch.randint(0, SMALL["vocab_size"], (2, 21), generator=torch.Generator().manual_seed(3))
    ref_main, ref = reference_mtp_logits(hf, extra, x)
    with torch.no_grad():
        logits, X = ours(x, return_hidden=True)
        (got,) = ours.mtp_logits(X[:, :-1], x[:, 1:])
    assert (logits - ref_main).abs().max().item() < 1e-5
    err = (got - ref).abs().max().item()
    print(f"{mtp_type}: MTP max abs logit error {err:.3e} (logits up to {ref.abs().max().item():.3f})")
    assert got.shape == (2, 20, SMALL["vocab_size"]) and err < 1e-5
    # the block's hook points fire at stable names
    from dsv3lab.probes.hooks import run_with_cache
    _, cache = run_with_cache(ours, x, "mtp.0.*", mtp=True)
    assert cache["mtp.0.hook_h_in"].shape == (2, 20, 2, 64) and cache["mtp.0.hook_mtp_out"].shape == (2, 20, 64)
    assert cache["mtp.0.hook_resid_post"].shape == (2, 20, 2, 64)
    assert torch.equal(cache["mtp_logits"][0], got)
    # routing traces record the MTP block as V3's depth (its own token ids t_{i+1})
    from dsv3lab.probes.trace import Trace
    with Trace(ours) as t, torch.no_grad():
        ours.mtp_logits(X[:, :-1], x[:, 1:])
    assert t.meta["mtp_depths"] == [0] and torch.equal(t.mtp[0].token_ids, x[:, 1:].reshape(-1))
    assert t.mtp[0].topk_ids.shape == (1, 40, SMALL["num_experts_per_tok"])


def _tiny_mtp(mtp_type, seed=0):
    cfg = dsv3lab.build("v4-tiny", device="meta").cfg.replace(num_nextn_predict_layers=1, mtp_layer_types=(mtp_type,))
    m = dsv3lab.build(cfg, seed=seed, dtype=torch.float32)
    _roughen(m.named_parameters(), torch.Generator().manual_seed(seed + 7))
    return m


def test_save_load_round_trip_with_fp8_ue8m0_and_fp4_experts_in_the_mtp_block(tmp_path):
    m = _tiny_mtp("compressed_sparse_attention")
    x = torch.randint(0, 512, (1, 19), generator=torch.Generator().manual_seed(0))
    d = save_v4(m, tmp_path / "plain")
    back = dsv3lab.load(d, dtype=torch.float32)
    sd, bsd = m.state_dict(), back.state_dict()
    assert sd.keys() == bsd.keys() and all(torch.equal(sd[k], bsd[k]) for k in sd)
    with torch.no_grad():
        _, X = m(x, return_hidden=True)
        X = X[:, :-1]
        assert torch.equal(back.mtp_logits(X, x[:, 1:])[0], m.mtp_logits(X, x[:, 1:])[0])
    m.cfg = m.cfg.replace(fp8_block_size=128, scale_fmt="ue8m0")
    d = save_v4(m, tmp_path / "q", fp8=True, fp4_experts=True)
    t = load_file(os.path.join(d, "model.safetensors"))
    ep, es = t["mtp.0.e_proj.weight"], t["mtp.0.e_proj.scale"]
    assert ep.dtype == torch.float8_e4m3fn and is_pow2(es).all() and "mtp.0.h_proj.scale" in t
    w1, s1 = t["mtp.0.ffn.experts.3.w1.weight"], t["mtp.0.ffn.experts.3.w1.scale"]
    assert w1.dtype == torch.uint8 and is_pow2(s1).all()
    assert t["mtp.0.attn.wq_a.weight"].dtype == torch.float8_e4m3fn
    assert t["mtp.0.hc_head_fn"].dtype == torch.float32 and t["mtp.0.hc_head_scale"].shape == (1,)
    assert not any(k.startswith("mtp.0.") and ("embed" in k or "head.weight" in k) for k in t)   # shared
    q = dsv3lab.load(d, dtype=torch.float32)
    assert torch.equal(q.mtp[0].e_proj.weight, weight_dequant(ep, es, 128, torch.float32))
    assert torch.equal(q.mtp[0].mlp.experts[3].gate_proj.weight, mxfp4_dequant(w1, s1, (32, 64)))
    # every tensor of the MTP block loads as stored: dequantized exactly, the rest bit for bit
    from dsv3lab.checkpoint.v4 import module_name
    qsd = q.state_dict()
    for k, v in t.items():
        if not k.startswith("mtp.") or k.endswith(".scale"):
            continue
        s = t.get(k[:-len(".weight")] + ".scale")
        want = (v.float() if s is None else mxfp4_dequant(v, s, tuple(qsd[module_name(k)].shape))
                if v.dtype == torch.uint8 else weight_dequant(v, s, 128, torch.float32))
        assert torch.equal(qsd[module_name(k)].float(), want), k
    with torch.no_grad():
        rel = ((q.mtp_logits(X, x[:, 1:])[0] - m.mtp_logits(X, x[:, 1:])[0]).abs().max()
               / m.mtp_logits(X, x[:, 1:])[0].abs().max()).item()
    assert rel < 0.2, rel                       # FP8 / FP4: close, not equal


def test_incomplete_or_misshaped_mtp_block_is_named(tmp_path):
    m = _tiny_mtp("heavily_compressed_attention")
    d = save_v4(m, tmp_path / "ck")
    f = os.path.join(d, "model.safetensors")
    t = load_file(f)
    save_file({k: v for k, v in t.items() if k != "mtp.0.h_proj.weight"}, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"MTP block is incomplete.*mtp\.0\.h_proj\.weight \[64, 64\]"):
        dsv3lab.load(d)
    save_file(dict(t, **{"mtp.0.hnorm.weight": t["mtp.0.hnorm.weight"][:40]}), f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'mtp\.0\.hnorm\.weight' has shape \[40\].*\[64\]"):
        dsv3lab.load(d)
    # no mtp.* tensor at all (what transformers writes): no MTP block, refused by name when asked
    save_file({k: v for k, v in t.items() if not k.startswith("mtp.")}, f, metadata={"format": "pt"})
    plain = dsv3lab.load(d)
    assert len(plain.mtp) == 0 and plain.cfg.num_nextn_predict_layers == 0
    with pytest.raises(ValueError, match="speculative decoding needs DeepSeek-V4's multi-token-prediction"):
        plain.generate([[1, 2, 3]], max_new_tokens=2, speculative=True)


@pytest.mark.parametrize("mtp_type", MTP_TYPES)
def test_cached_mtp_decode_equals_the_full_forward(mtp_type):
    m = _tiny_mtp(mtp_type)
    x = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, X = m(x[:, :-1], return_hidden=True)
        (full,) = m.mtp_logits(X, x[:, 1:])
        cache = m.new_cache(2, 40)
        _, Xc = m(x[:, :-1], cache=cache, return_hidden=True)
        steps = [m.mtp_logits(Xc[:, :7], x[:, 1:8], start=0, cache=cache)[0]]      # window and pools cross
        steps += [m.mtp_logits(Xc[:, t:t + 1], x[:, t + 1:t + 2], start=t, cache=cache)[0] for t in range(7, 29)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-5
    assert cache.nbytes() > cache.nbytes(include_mtp=False)
    with pytest.raises(ValueError, match=r"h must be the mHC streams \[B,S,2,D\]"):
        m.mtp_logits(X[:, :, 0], x[:, 1:])                  # a collapsed hidden state, V3's form
    with pytest.raises(ValueError, match=r"streams \(2, 10\) must cover the next tokens \(2, 29\)"):
        m.mtp_logits(X[:, :10], x[:, 1:])


@pytest.mark.parametrize("mtp_type", MTP_TYPES)
def test_speculative_greedy_equals_plain_greedy(mtp_type):
    """The MTP block drafts, the main model verifies: the same tokens as plain greedy decoding.
    Its e_proj is set to the identity and h_proj to zero, so the draft is the main model's
    context-free guess and is accepted often but not always: both the accepted path and the
    rejected one (the V4 cache rewound) run."""
    m = _tiny_mtp(mtp_type)
    with torch.no_grad():
        m.mtp[0].e_proj.weight.copy_(torch.eye(64))
        m.mtp[0].h_proj.weight.zero_()
        m.mtp[0].self_attn.o_b_proj.weight.mul_(0.1)
        m.mtp[0].hc_head.hc_base.zero_()
        for norm in (m.mtp[0].enorm, m.mtp[0].norm):
            norm.weight.copy_(m.norm.weight)
    prompt = torch.randint(0, 512, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = m.generate([prompt], max_new_tokens=30, stop_tokens=[])[0]
    spec, stats = generate_speculative(m, prompt, 30, stop_tokens=[], return_stats=True)
    print(f"{mtp_type}: acceptance {stats['acceptance_rate']:.2f}, tokens/step {stats['tokens_per_step']:.2f}")
    assert spec == plain
    assert 0 < stats["accepted"] < stats["steps"]
    assert m.generate([prompt], max_new_tokens=30, stop_tokens=[], speculative=True)[0] == plain
