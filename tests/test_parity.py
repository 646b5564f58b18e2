"""Logit parity with transformers' DeepseekV3ForCausalLM (installed 5.x, eager, fp32).

Each config is saved by transformers with ``save_pretrained`` and loaded by ``dsv3lab.load``;
every position's logits must agree within 1e-4 relative, and the routing decisions (top-k sets
per token per MoE layer) must be identical before logits are compared (docs/references.md#transformers, trap 2).
"""

import pytest
import torch

import dsv3lab

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from hf_reference import roughen, save_eager  # noqa: E402

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, n_routed_experts=16,
            n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
            initializer_range=0.05, num_nextn_predict_layers=0)
YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)

CASES = {
    "yarn-groups": dict(rope_scaling=YARN),
    "no-yarn": dict(rope_scaling=None),
    "v2lite-style-q-full-rank": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=YARN,
                                      num_experts_per_tok=6, n_shared_experts=2),
    "many-groups-k8": dict(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=8,
                           rope_scaling=dict(YARN, mscale=0.707, mscale_all_dim=0.707)),
    "all-moe": dict(first_k_dense_replace=0, num_hidden_layers=2, rope_scaling=YARN),
}


def make_hf(tmp_path, case, seed=0):
    torch.manual_seed(seed)
    kw = dict(BASE, **CASES[case])
    rs = kw.pop("rope_scaling")
    cfg = DeepseekV3Config(num_key_value_heads=kw["num_attention_heads"], rope_scaling=rs, **kw)
    cfg._attn_implementation = "eager"
    m = DeepseekV3ForCausalLM(cfg).float().eval()
    roughen(m, cfg)
    d = tmp_path / case
    save_eager(m, d)
    return m, d


def hf_routing(m, x):
    ids = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, i, o: ids.append(o[2].sort(-1).values))
             for layer in m.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        logits = m(x).logits
    for h in hooks:
        h.remove()
    return logits, ids


def our_routing(model, x):
    ids = []
    hooks = [layer.mlp.gate.hook_topk_ids.register_forward_hook(lambda mod, i, o: ids.append(o.sort(-1).values))
             for layer in model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return logits, ids


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    m, d = make_hf(tmp_path, case)
    ours = dsv3lab.load(d, dtype=torch.float32)
    x = torch.randint(0, BASE["vocab_size"], (3, 29), generator=torch.Generator().manual_seed(1))
    ref, ref_ids = hf_routing(m, x)
    got, got_ids = our_routing(ours, x)
    assert len(ref_ids) == len(got_ids) > 0
    for a, b in zip(ref_ids, got_ids):
        assert torch.equal(a, b), "routing decisions differ from transformers"
    assert got.shape == ref.shape == (3, 29, BASE["vocab_size"])
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"max relative logit error {rel:.2e}"
    # the absorbed decode path reproduces the same logits position by position
    cache = ours.new_cache(3, 29)
    with torch.no_grad():
        step = [ours(x[:, :10], start=0, cache=cache)]
        for t in range(10, 29):
            step.append(ours(x[:, t:t + 1], start=t, cache=cache))
    inc = torch.cat(step, dim=1)
    rel = ((inc - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-4, f"incremental decode: max relative logit error {rel:.2e}"
