"""What DeepSeek Sparse Attention costs against dense MLA, per token, as a function of context.

Attention only (the indexer and the core attention; projections into q, the latent and o_proj are
the same in both and are left out), per layer, matmul FLOPs (2 per multiply-add, what
``torch.utils.flop_counter`` counts) and bytes read from the caches. H heads, c = kv_lora_rank,
r = qk_rope_head_dim, n = qk_nope, v = v_head_dim, H_I x D_I the indexer, k = index_topk, and a
query at position t sees T = t + 1 keys, K = min(k, T) of them selected:

  indexer      projections  2 (q_lora D_I H_I + hidden D_I + hidden H_I)        per token
               scores       2 H_I (D_I + 1) T       (q.k for every key and head, then sum_h w_h relu)
  core, decode (absorbed)   2 H n c + 2 H c v       (W_UK into q, W_UV out of the latent)
                            + 4 H (c + r) X         X = T dense, K sparse: scores, then the weighted
                                                     sum over whole (c + r)-wide rows (the engine drops
                                                     the r rope columns after the product; a fused
                                                     kernel needs 2 H (2c + r) X)
  core, prefill dense       2 H (n + r + v) T       (expanded per-head K/V and SDPA; + the expansion
                                                     2 c H (n + v) per token)
  core, prefill sparse      as decode with X = K    (DSA runs on MLA's latent "MQA mode": gathered
                                                     latent rows, V3.2 report sec. 2.1)
  bytes, decode             latent rows read: (c + r) x elem x X;  indexer keys: key_bytes x T
  key_bytes                 D_I x 2 (bf16) or D_I + 4 D_I / 128 (FP8 e4m3 + fp32 scale; 132 at D_I = 128)

So core attention is O(k) per token and the indexer O(T) with H_I (D_I + 1) = 8,256 multiply-adds
per key for V3.2 against MLA's H (2c + r) = 139,264: the indexer is the part that still grows with
the context, 17x more cheaply. ``measured_attention_flops`` counts a real forward with torch's flop
counter (taught the CPU SDPA kernel, which it does not count by itself); the engine pads V to the
q/k width for that kernel in the expanded dense prefill, so a check of dense prefill against this
model uses ``absorb_prefill``. ``causal=False`` counts what a rectangular prefill (every query
against all T keys, then masked) executes, which is what the engine's one-chunk prefill does.
"""

from __future__ import annotations

from dsv3lab.config import ModelConfig


def _cfg(cfg) -> ModelConfig:
    return ModelConfig.preset(cfg) if isinstance(cfg, str) else cfg


def indexer_key_bytes(cfg, key_format: str = "fp8", dtype_bytes: int = 2) -> float:
    """Bytes of one token's indexer key in one layer: 132 for V3.2 in FP8, 256 in bf16;
    ``key_format="model"`` keeps keys in the model dtype (``dtype_bytes`` each)."""
    cfg = _cfg(cfg)
    D = cfg.index_head_dim
    if key_format == "fp8":
        from dsv3lab.model.indexer import fp8_block
        return D + 4 * D // fp8_block(D)
    return D * (2 if key_format == "bf16" else dtype_bytes)


def kv_bytes_per_token(cfg, key_format: str = "fp8", dtype_bytes: int = 2) -> dict:
    """Per-token cache bytes over all main layers: the latent, the indexer keys, their sum."""
    cfg = _cfg(cfg)
    L = cfg.num_hidden_layers
    latent = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    # GLM-5's shared layers keep no indexer keys: only the layers that run an indexer count
    index = cfg.n_indexer_layers * indexer_key_bytes(cfg, key_format, dtype_bytes) if cfg.has_indexer else 0
    return dict(latent=latent, indexer=index, total=latent + index)


def _indexer_proj_flops(cfg) -> float:
    H, D = cfg.index_n_heads, cfg.index_head_dim
    return 2.0 * (cfg.q_lora_rank * D * H + cfg.hidden_size * D + cfg.hidden_size * H)


def _keys_sum(context: int, phase: str, causal: bool) -> float:
    """Sum over the queries of one token's visible keys (decode: T = context + 1 for the new token;
    prefill of `context` tokens: per token average of t + 1, or T for every query if not causal)."""
    if phase == "decode":
        return context + 1
    return (context + 1) / 2 if causal else context


def _selected(context: int, k: int, phase: str, causal: bool) -> float:
    """Per-token average of min(k, visible keys)."""
    if phase == "decode":
        return min(k, context + 1)
    if not causal:
        return min(k, context)
    L = context
    # sum_{t=1..L} min(k, t) / L
    m = min(k, L)
    return (m * (m + 1) / 2 + (L - m) * k) / L


def attention_cost(cfg, context: int, phase: str = "decode", sparse: bool | None = None,
                   key_format: str = "bf16", dtype_bytes: int = 2, causal: bool = True,
                   index_topk: int | None = None, absorb_prefill: bool = False) -> dict:
    """Per token per layer: FLOPs and cache bytes of the indexer and of core attention.

    decode: one new token after ``context`` cached ones; prefill: average per token of a
    ``context``-token prefill. ``sparse=None`` means sparse exactly when the config has an
    indexer; ``sparse=False`` on a V3.2 config is the same model with dense MLA (no indexer).
    ``absorb_prefill`` prices a dense prefill in the latent space (``MLA.absorb_prefill``)."""
    cfg = _cfg(cfg)
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    sparse = cfg.has_indexer if sparse is None else sparse
    if sparse and not cfg.has_indexer:
        raise ValueError(f"config {cfg.name!r} has no indexer (index_topk = 0)")
    H, c, r, n, v = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim,
                     cfg.qk_nope_head_dim, cfg.v_head_dim)
    k = index_topk or cfg.index_topk
    T = _keys_sum(context, phase, causal)
    out = dict(indexer_flops=0.0, indexer_bytes=0.0)
    if sparse:
        HI, DI = cfg.index_n_heads, cfg.index_head_dim
        out["indexer_flops"] = _indexer_proj_flops(cfg) + 2.0 * HI * (DI + 1) * T
        out["indexer_bytes"] = indexer_key_bytes(cfg, key_format, dtype_bytes) * T if phase == "decode" else 0.0
        X = _selected(context, k, phase, causal)
        if X >= T:                  # every visible key selected: the dense code runs
            sparse = False
    if not sparse:
        X = T
    absorbed = phase == "decode" or sparse or absorb_prefill
    if absorbed:
        core = 2.0 * H * n * c + 2.0 * H * c * v + 4.0 * H * (c + r) * X
    else:
        core = 2.0 * c * H * (n + v) + 2.0 * H * (n + r + v) * X
    out["core_flops"] = core
    out["core_bytes"] = (c + r) * dtype_bytes * X if phase == "decode" else 0.0
    out["keys_attended"] = X
    out["flops"] = out["indexer_flops"] + out["core_flops"]
    out["bytes"] = out["indexer_bytes"] + out["core_bytes"]
    return out


def cost_curves(cfg, contexts, phase: str = "decode", **kw) -> list[dict]:
    """Rows {context, mode, indexer_flops, core_flops, flops, bytes, ...} for dense and sparse
    (all layers: per-layer figures x num_hidden_layers) at each context."""
    cfg = _cfg(cfg)
    rows = []
    for T in contexts:
        for mode, sp in (("dense", False), ("sparse", True)):
            if sp and not cfg.has_indexer:
                continue
            c = attention_cost(cfg, T, phase, sparse=sp, **kw)
            L = cfg.num_hidden_layers
            c["flops"], c["bytes"] = c["core_flops"], c["core_bytes"]   # the indexer's share added below
            for k in ("indexer_flops", "indexer_bytes"):           # shared layers (GLM-5) run no indexer
                c[k] *= cfg.n_indexer_layers / L
                c[k.replace("indexer_", "")] += c[k]
            rows.append(dict(context=T, mode=mode, **{k: v * L for k, v in c.items() if k != "keys_attended"},
                             keys_attended=c["keys_attended"]))
    return rows


def crossover_context(cfg, phase: str = "decode", what: str = "flops", **kw) -> int | None:
    """Smallest context at which sparse attention costs less than dense (``what``: flops or
    bytes), by bisection over [1, max_position_embeddings]; None if it never does."""
    cfg = _cfg(cfg)

    def cheaper(T):
        return (attention_cost(cfg, T, phase, sparse=True, **kw)[what]
                < attention_cost(cfg, T, phase, sparse=False, **kw)[what])

    lo, hi = 1, cfg.max_position_embeddings
    if not cheaper(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if cheaper(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def measured_attention_flops(model, tokens, start: int = 0, cache=None) -> dict:
    """FLOPs torch's flop counter sees in one forward, split into the indexer
    (``self_attn.indexer``) and the rest of attention (between the projections and o_proj),
    summed over the main layers; for checking ``attention_cost`` on a real run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from dsv3lab.model.mla import MLA

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kw):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # torch counts the CUDA SDPA kernels but not the CPU one the engine's decode step uses
    cpu_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={cpu_op: cpu_sdpa}) as fc, torch.no_grad():
        model(tokens, start=start, cache=cache)
    per = fc.get_flop_counts()
    index = attn = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, MLA) or ".mtp." in f".{name}.":
            continue
        total = sum(per.get(f"Transformer.{name}", {}).values()) if per.get(f"Transformer.{name}") else 0
        idx = sum(per.get(f"Transformer.{name}.indexer", {}).values())
        proj = sum(sum(per.get(f"Transformer.{name}.{p}", {}).values()) for p in
                   ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "o_proj"))
        index += idx
        attn += total - idx - proj
    return dict(indexer_flops=float(index), core_flops=float(attn))
