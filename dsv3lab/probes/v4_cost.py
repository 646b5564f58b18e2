"""DeepSeek-V4's KV cache in bytes, as the engine holds it, against context (docs/v4.md#kv).

Per layer of a sequence of T tokens (d = head_dim, W = sliding_window, b bytes per value, D_I =
index_head_dim, m = the layer's compression rate):

  every layer      window       (W - 1) d b                 constant: the last W-1 rows
  HCA layer        entries      floor(T / m') d b           one entry per closed window
  CSA layer        entries      floor(T / m) d b            + the indexer's keys floor(T / m) D_I b
  both             state        (T mod m) 2X b              the unclosed window's projected kv and
                                                            gate (X = d, or 2d when overlapping)
                                + m d (b + 4) (CSA, T >= m) the last closed window's first series:
                                                            kv in the model dtype, gate in fp32 (it
                                                            carries the fp32 position bias); and the
                                                            indexer's, at D_I

so per token of context a CSA layer keeps (d + D_I) / m values and an HCA layer d / m', against
V3's (kv_lora_rank + qk_rope_head_dim) latent values in every layer (V3.2: plus its indexer key).
``kv_bytes`` is exactly what ``model.new_cache(1, T).nbytes()`` holds after T tokens
(tests/test_v4_cost.py); ``per_token`` is the limit as T grows (the window and the state amortised
away). The engine keeps the cache in the model dtype; what the release stores (FP8 for most of
each entry, per the V4 report) would lower the V4 figures further.
"""

from __future__ import annotations

import functools

from dsv3lab.config import V4Config


def _cfg(cfg) -> V4Config:
    return V4Config.preset(cfg) if isinstance(cfg, str) else cfg


def kv_bytes(cfg, context: int, dtype_bytes: int = 2) -> dict:
    """Bytes of the engine's cache for one sequence of ``context`` tokens (cache made for that length)."""
    cfg = _cfg(cfg)
    d, W, T, b = cfg.head_dim, cfg.sliding_window, context, dtype_bytes
    out = dict(window=0, entries=0, indexer=0, state=0)
    for i, t in enumerate(cfg.layer_types):
        out["window"] += max(W - 1, 0) * d * b
        m = cfg.compress_rate(i)
        if not m:
            continue
        csa = t == "compressed_sparse_attention"
        out["entries"] += (T // m) * d * b
        out["state"] += (T % m) * 2 * (2 * d if csa else d) * b
        if csa:
            Di = cfg.index_head_dim
            out["indexer"] += (T // m) * Di * b
            out["state"] += (T % m) * 2 * 2 * Di * b
            if T >= m:
                out["state"] += m * (d + Di) * (b + 4)
    out["total"] = sum(out.values())
    return out


def per_token(cfg, dtype_bytes: int = 2) -> float:
    """Cache bytes per token of context as the context grows (window and state amortised)."""
    cfg = _cfg(cfg)
    total = 0.0
    for i, t in enumerate(cfg.layer_types):
        m = cfg.compress_rate(i)
        if m:
            total += cfg.head_dim / m + (cfg.index_head_dim / m if t == "compressed_sparse_attention" else 0)
    return total * dtype_bytes


def against_v32(cfg, context: int = 1 << 20, dtype_bytes: int = 2) -> dict:
    """V4's cache per token at ``context`` against V3.2's (its latent + FP8 indexer keys, the
    lab's ``dsa_cost.kv_bytes_per_token``): the model card's "10% of V3.2's KV cache at 1M"."""
    from dsv3lab.probes import dsa_cost
    v4 = kv_bytes(cfg, context, dtype_bytes)["total"] / context
    v32 = dsa_cost.kv_bytes_per_token("v3.2-671b")["total"]
    return dict(v4=v4, v32=v32, ratio=v4 / v32)


# --- attention FLOPs of a decode step ---------------------------------------------------------
# A query at position t (T = t + 1 tokens seen) in one layer, matmul FLOPs (2 per multiply-add,
# what torch's flop counter counts), the projections left out (they cost the same at any context):
#
#   window      4 H d min(W, T)                     scores and the weighted sum over the rows
#   HCA         4 H d floor(T / m')                 every closed window's entry
#   CSA         4 H d min(k, floor(T / m))          only the indexer's top-k entries (gathered)
#               + 2 H_I D_I floor(T / m)             the indexer's scores over every entry
#
# so a sliding layer costs O(W), HCA O(T / 128) and CSA O(k) + O(T / 4) on the indexer's few
# narrow heads; V3.2 pays O(k) core and O(T) indexer per layer, V3 O(T) core.

def attention_flops(cfg, t: int) -> dict:
    """Core attention FLOPs of one decode step at position ``t``, per layer type and in total."""
    cfg = _cfg(cfg)
    H, d, W, T = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window, t + 1
    out = dict(window=0.0, compressed=0.0, indexer=0.0)
    for i, kind in enumerate(cfg.layer_types):
        out["window"] += 4.0 * H * d * min(W, T)
        m = cfg.compress_rate(i)
        if not m:
            continue
        n = T // m
        if kind == "compressed_sparse_attention":
            out["compressed"] += 4.0 * H * d * min(cfg.index_topk, n)
            out["indexer"] += 2.0 * cfg.index_n_heads * cfg.index_head_dim * n
        else:
            out["compressed"] += 4.0 * H * d * n
    out["total"] = sum(out.values())
    return out


_PROJECTIONS = ("q_a_proj", "q_b_proj", "kv_proj", "o_a_proj", "o_b_proj", "compressor.kv_proj",
                "compressor.gate_proj", "compressor.indexer.kv_proj", "compressor.indexer.gate_proj",
                "compressor.indexer.q_b_proj", "compressor.indexer.weights_proj")


def measured_attention_flops(model, tokens, start: int = 0, cache=None) -> float:
    """Core attention FLOPs torch's flop counter sees in one forward of a V4 model (every
    ``self_attn`` less its projections), summed over layers; to check ``attention_flops``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(tokens, start=start, cache=cache)
    per = fc.get_flop_counts()
    root = type(model).__name__
    total = 0.0
    for i in range(len(model.layers)):
        name = f"{root}.layers.{i}.self_attn"
        total += sum(per.get(name, {}).values())
        total -= sum(sum(per.get(f"{name}.{p}", {}).values()) for p in _PROJECTIONS)
    return float(total)


def per_token_flops(cfg, context: int) -> dict:
    """Forward FLOPs of one decode token at ``context``: 2 x the activated weights it multiplies
    (embedding excluded) plus core attention; V4 against V3.2 (the card: 27% at 1M for V4-Pro)."""
    from dsv3lab.probes import dsa_cost
    from dsv3lab.stats import _counts as v3_counts

    cfg = _cfg(cfg)
    # the weights a token multiplies: activated parameters less the embedding lookup (the MTP
    # layer, not used for the next token, left out of V3.2's; V4 here has none)
    c4 = counts(cfg)
    v4 = 2.0 * (c4["activated_params"] - c4["embedding_params"]) + attention_flops(cfg, context - 1)["total"]
    v32cfg = dsa_cost._cfg("v3.2-671b")
    c32 = v3_counts(v32cfg)
    att = dsa_cost.attention_cost(v32cfg, context - 1)
    c = v32cfg
    # attention_cost also prices the indexer's projections and W_UK / W_UV, which are weights
    # already in the 2 x activated term: only the context-dependent products are added here
    weight_part = dsa_cost._indexer_proj_flops(c) + 2.0 * c.num_attention_heads * c.kv_lora_rank * (
        c.qk_nope_head_dim + c.v_head_dim)
    v32 = 2.0 * (c32["activated_params"] - c32["embedding_params"]) + c.num_hidden_layers * (
        att["core_flops"] + att["indexer_flops"] - weight_part)
    return dict(v4=v4, v32=v32, ratio=v4 / v32)


def counts(cfg) -> dict:
    """Parameters of a V4 config counted on the meta device: total, activated per token (the
    routed experts at top-k / E, embedding included), embedding (cached per config)."""
    return dict(_counts(_cfg(cfg)))


@functools.lru_cache(maxsize=16)
def _counts(cfg: V4Config) -> dict:
    import dsv3lab
    m = dsv3lab.build(cfg, device="meta")
    c = m.cfg
    # the published totals leave the MTP block out, as V3's 671B does (stats._counts)
    main = [(n, p) for n, p in m.named_parameters() if not n.startswith("mtp.")]
    total = sum(p.numel() for _, p in main)
    routed = sum(p.numel() for n, p in main if ".experts." in n)
    return dict(total_params=total, activated_params=total - routed + routed * c.num_experts_per_tok // c.n_routed_experts,
                embedding_params=m.embed_tokens.weight.numel(), routed_expert_params=routed,
                mtp_params=sum(p.numel() for p in m.mtp.parameters()))


def v4_stats(cfg, context: int = 4096) -> dict:
    """What ``dsv3lab info`` prints for a V4 config: parameters, the cache per token at ``context``
    (bf16, the cache made for that length, after it) and as context grows, forward FLOPs per token
    at ``context`` and both against V3.2's."""
    cfg = _cfg(cfg)
    c = counts(cfg)
    f = per_token_flops(cfg, context)
    kv = kv_bytes(cfg, context)
    c.update(name=cfg.name, context=context, kv_cache_bytes_per_token=kv["total"] / context,
             kv_cache_bytes_per_token_limit=per_token(cfg), kv_cache_parts=kv,
             kv_vs_v32=against_v32(cfg, context)["ratio"], forward_flops_per_token=f["v4"],
             forward_flops_vs_v32=f["ratio"])
    return c
