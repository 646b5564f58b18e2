"""The one key adapter between module names and checkpoint keys (DeepSeek-V3's layout on the Hub).

A checkpoint is keyed as DeepSeek-V3 ships:

  model.embed_tokens.weight, model.norm.weight, lm_head.weight
  model.layers.L.{input_layernorm, post_attention_layernorm}.weight
  model.layers.L.self_attn.{q_a_proj|q_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
                            kv_a_layernorm, kv_b_proj, o_proj}.weight
  model.layers.L.self_attn.indexer.{wq_b, wk, weights_proj}.weight, indexer.k_norm.{weight,bias}
                                                                          (V3.2's DSA indexer)
  model.layers.L.mlp.{gate,up,down}_proj.weight                           (dense layers)
  model.layers.L.mlp.gate.weight, model.layers.L.mlp.gate.e_score_correction_bias
  model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight, mlp.shared_experts.{...}.weight
  model.layers.{n+k}.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens}
                                                                          (MTP depth k, n = layers)
FP8 weights (attention and indexer projections, dense and expert FFNs) are e4m3 with a
``.weight_scale_inv`` fp32 tensor per 128x128 block (powers of two under ``scale_fmt="ue8m0"``).
The MTP layer's ``embed_tokens`` and ``shared_head.head`` are copies of the main model's
(``MTP_COPIES``): read by nobody, written by ``save``.
"""

from __future__ import annotations

import re
from typing import Optional

from dsv3lab.config import ModelConfig

_FP8_RE = re.compile(r"\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
                     r"|indexer\.wq_b|indexer\.wk)\.weight$"
                     r"|\.mlp\.((experts\.\d+|shared_experts)\.)?(gate|up|down)_proj\.weight$")
# kept in fp32 whatever the model's dtype: the router (its logits pick experts) and the indexer's
# head weights (transformers keeps ``indexer.weights_proj`` in fp32 as well)
_FP32_RE = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$|\.indexer\.weights_proj\.weight$")
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def is_fp8_key(hf_key: str) -> bool:
    """Whether the official checkpoint stores this tensor in FP8: attention and indexer
    projections (wq_b, wk), dense, shared and routed expert FFNs. MTP's eh_proj, the gate, the
    indexer's weights_proj and k_norm, norms, embeddings and the head stay BF16/FP32."""
    return bool(_FP8_RE.search(hf_key))


def is_fp32_key(hf_key: str) -> bool:
    """Whether this tensor stays fp32 in a BF16/FP8 checkpoint (gate weight and bias, weights_proj)."""
    return bool(_FP32_RE.search(hf_key))


def hf_key(cfg: ModelConfig, name: str) -> str:
    """Module state-dict name -> checkpoint key."""
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def module_key(cfg: ModelConfig, key: str) -> Optional[str]:
    """Checkpoint key -> module name; None for the MTP copies of the embedding and head."""
    if key.startswith("lm_head."):
        return key
    if not key.startswith("model."):
        return "?" + key
    name = key[6:]
    m = re.match(r"layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        k = int(m.group(1)) - cfg.num_hidden_layers
        if m.group(2) in MTP_COPIES:
            return None
        return f"mtp.{k}.{m.group(2)}"
    return name
