"""DeepSeek-V4's KV cache in bytes, as the engine holds it, against context (docs/v4.md#kv).

Per layer of a sequence of T tokens (d = head_dim, W = sliding_window, b bytes per value, D_I =
index_head_dim, m = the layer's compression rate):

  every layer      window       (W - 1) d b                 constant: the last W-1 rows
  HCA layer        entries      floor(T / m') d b           one entry per closed window
  CSA layer        entries      floor(T / m) d b            + the indexer's keys floor(T / m) D_I b
  both             state        (T mod m) 2X b              the unclosed window's projected kv and
                                                            gate (X = d, or 2d when overlapping)
                                + 2 m d b (CSA, T >= m)     the last closed window's first series
                                                            (and the indexer's, at D_I)

so per token of context a CSA layer keeps (d + D_I) / m values and an HCA layer d / m', against
V3's (kv_lora_rank + qk_rope_head_dim) latent values in every layer (V3.2: plus its indexer key).
``kv_bytes`` is exactly what ``model.new_cache(1, T).nbytes()`` holds after T tokens
(tests/test_v4_cost.py); ``per_token`` is the limit as T grows (the window and the state amortised
away). The engine keeps the cache in the model dtype; what the release stores (FP8 for most of
each entry, per the V4 report) would lower the V4 figures further.
"""

from __future__ import annotations

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
                out["state"] += 2 * m * (d + Di) * b
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
