"""KV-cache memory: what one token costs under MLA and under the layouts it replaces.

Per token per layer, in values (H heads, n = qk_nope, r = qk_rope, v = v_head_dim, c = kv_lora_rank,
d_h = v_head_dim is the per-head width the MLA paper (V2, Table 1) uses for its comparison):

  absorbed   c + r                 the latent c_kv and the shared rotated k_pe (V3: 576)
  naive      H (n + r + v)         the per-head K and V the engine's naive mode caches (V3: 40,960)
  mha        2 H d_h               a plain multi-head cache of the same heads (V3: 32,768)
  gqa-g      2 g d_h               g key/value groups (V3 width with g = 8: 2,048)
  mqa        2 d_h                 one shared key/value head (256)

Bytes per token = layers x values x element size. ``measured_bytes_per_token`` allocates the
engine's own cache (``Transformer.new_cache`` or the same cache classes directly) and divides its
``nbytes()`` by batch x max_len, so the analytic figure is checked against live buffers.

The report's comparison (ISCA '25 Table 1, BF16; docs/references.md#kv-bytes):
DeepSeek-V3 70,272 B/token, Qwen-2.5 72B 327,680 (printed 4.66x), LLaMA-3.1 405B 516,096
(printed 7.28x; the bytes give 7.34x). ``REPORT_MODELS`` holds the config numbers these come from.
"""

from __future__ import annotations

import torch

from dsv3lab.config import ModelConfig

LAYOUTS = ("absorbed", "naive", "mha", "gqa", "mqa")

# Layers and KV layout of the models the report compares against (BF16; ISCA '25 Table 1,
# docs/references.md#kv-bytes).
REPORT_MODELS = {
    "DeepSeek-V3": dict(kind="mla", num_hidden_layers=61, kv_lora_rank=512, qk_rope_head_dim=64,
                        printed_ratio=None),
    "Qwen-2.5 72B": dict(kind="gqa", num_hidden_layers=80, num_key_value_heads=8, head_dim=128,
                         printed_ratio="4.66x"),
    "LLaMA-3.1 405B": dict(kind="gqa", num_hidden_layers=126, num_key_value_heads=8, head_dim=128,
                           printed_ratio="7.28x"),
}


def _cfg(cfg) -> ModelConfig:
    return ModelConfig.preset(cfg) if isinstance(cfg, str) else cfg


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.tensor([], dtype=dtype).element_size()


def values_per_token_per_layer(cfg, layout: str = "absorbed", gqa_groups: int = 8) -> int:
    cfg = _cfg(cfg)
    H, dh = cfg.num_attention_heads, cfg.v_head_dim
    if layout == "absorbed":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    if layout == "naive":
        return H * (cfg.qk_head_dim + cfg.v_head_dim)
    if layout == "mha":
        return 2 * H * dh
    if layout == "gqa":
        return 2 * gqa_groups * dh
    if layout == "mqa":
        return 2 * dh
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _v4(cfg):
    """The V4Config of a V4 config or preset name, else None."""
    from dsv3lab.family import is_v4
    if not is_v4(cfg):
        return None
    from dsv3lab.config import V4Config
    return V4Config.preset(cfg) if isinstance(cfg, str) else cfg


def v4_bytes_per_token(cfg, dtype=torch.bfloat16, layout: str | None = None, include_mtp: bool = False,
                       context: int | None = None) -> float:
    """DeepSeek-V4's cache per token (the window's rows, compressed entries, CSA's indexer keys,
    the pools' state; ``probes.v4_cost``): at ``context`` tokens, the cache made for that length
    after them (what ``measured_bytes_per_token`` allocates); without ``context`` its limit as
    context grows. Not constant per token: the window is fixed and entries come every m tokens."""
    from dsv3lab.probes import v4_cost
    if layout not in (None, "v4"):
        raise ValueError(f"layout {layout!r}: a DeepSeek-V4 model keeps its own cache ('v4': sliding window "
                         "plus compressed entries), not MLA's layouts")
    if include_mtp and cfg.num_nextn_predict_layers:
        # an MTP block caches what a main layer of its attention type caches
        k = cfg.num_nextn_predict_layers
        cfg = cfg.replace(num_hidden_layers=cfg.num_hidden_layers + k, layer_types=cfg.layer_types + cfg.mtp_layer_types,
                          mlp_layer_types=cfg.mlp_layer_types + ("moe",) * k, num_nextn_predict_layers=0,
                          mtp_layer_types=())
    b = dtype_bytes(dtype)
    if context is None:
        return v4_cost.per_token(cfg, b)
    return v4_cost.kv_bytes(cfg, context, b)["total"] / context


def bytes_per_token(cfg, dtype=torch.bfloat16, layout: str | None = None, include_mtp: bool = False,
                    gqa_groups: int = 8, index_keys: str = "fp8", context: int | None = None):
    """Cache bytes one token occupies over all layers (MTP blocks too with ``include_mtp``).
    ``layout`` None is "absorbed"; ``layout="sparse"`` (V3.2): the latent plus the indexer's key
    in ``index_keys`` format ("fp8": 132 B per layer at V3.2's sizes, "bf16", "model";
    ``probes.dsa_cost``). A V4 config or preset: ``v4_bytes_per_token`` (a float, at ``context``)."""
    v4 = _v4(cfg)
    if v4 is not None:
        return v4_bytes_per_token(v4, dtype, layout, include_mtp, context)
    layout = layout or "absorbed"
    cfg = _cfg(cfg)
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    if layout == "sparse":
        from dsv3lab.probes.dsa_cost import indexer_key_bytes
        key = int(indexer_key_bytes(cfg, index_keys, dtype_bytes(dtype))) if cfg.has_indexer else 0
        # GLM-5's shared layers keep no indexer keys (MTP blocks run their own indexer)
        keyed = cfg.n_indexer_layers + (cfg.num_nextn_predict_layers if include_mtp else 0) if key else 0
        return layers * values_per_token_per_layer(cfg, "absorbed") * dtype_bytes(dtype) + keyed * key
    return layers * values_per_token_per_layer(cfg, layout, gqa_groups) * dtype_bytes(dtype)


def layout_table(cfg, dtype=torch.bfloat16, gqa_groups: int = 8) -> list[dict]:
    """Rows (layout, values/token/layer, bytes/token/layer, bytes/token, x absorbed)."""
    cfg = _cfg(cfg)
    base = bytes_per_token(cfg, dtype, "absorbed")
    rows = []
    for layout in LAYOUTS:
        per_layer = values_per_token_per_layer(cfg, layout, gqa_groups)
        b = bytes_per_token(cfg, dtype, layout, gqa_groups=gqa_groups)
        rows.append(dict(layout=layout if layout != "gqa" else f"gqa-{gqa_groups}",
                         values_per_layer=per_layer, bytes_per_layer=per_layer * dtype_bytes(dtype),
                         bytes_per_token=b, vs_absorbed=b / base))
    return rows


def measured_bytes_per_token(model_or_cfg, mode: str | None = None, dtype=torch.bfloat16,
                             batch: int = 2, max_len: int = 8, include_mtp: bool = True):
    """Allocate the engine's cache for ``batch x max_len`` positions and return nbytes per token.
    A model uses ``model.new_cache``; a config (any preset, 671B included: the cache is small at
    small max_len) uses the same cache classes with the model's layer count. ``mode`` None is
    "absorbed". A V4 model (or a V4 config, built: lab sizes only) grows its cache as tokens
    come: ``max_len`` random tokens are fed through it first (bytes per token, a float)."""
    from dsv3lab.model.mla import attention_class
    v4 = _v4(model_or_cfg) if not isinstance(model_or_cfg, torch.nn.Module) else getattr(model_or_cfg, "cfg", None)
    if _v4(v4) is not None:
        if mode not in (None, "v4"):
            raise ValueError(f"mode {mode!r}: a DeepSeek-V4 model keeps its own cache ('v4')")
        from dsv3lab.model.build import build
        model = model_or_cfg if isinstance(model_or_cfg, torch.nn.Module) else build(v4, dtype=dtype)
        cache = model.new_cache(batch, max_len, dtype=dtype)
        tokens = torch.randint(0, v4.vocab_size, (batch, max_len + 1), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(model.device)
        with torch.no_grad():
            _, X = model(tokens[:, :-1], cache=cache, return_hidden=True)
            if include_mtp and len(model.mtp):
                model.mtp_logits(X, tokens[:, 1:], cache=cache)
        return cache.nbytes(include_mtp) / (batch * max_len)
    mode = mode or "absorbed"
    if isinstance(model_or_cfg, torch.nn.Module):
        model = model_or_cfg
        prev = model.attn_mode
        cache = model.new_cache(batch, max_len, mode=mode, dtype=dtype)
        model.set_attn_mode(prev)
        n_layers = len(cache.layers)
    else:
        cfg = _cfg(model_or_cfg)
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
        # the cache class is the attention implementation's own (the seam's registry), so a new
        # variant is counted as it allocates; an unknown mode is refused by name
        cache = attention_class(mode).cache_cls(cfg, n_layers, batch, max_len, dtype, "cpu")
    per = cache.nbytes() // (batch * max_len)
    if not include_mtp:
        cfg = model_or_cfg.cfg if isinstance(model_or_cfg, torch.nn.Module) else _cfg(model_or_cfg)
        per = per * cfg.num_hidden_layers // n_layers
    return per


def capacity(cfg, budget_bytes: float, dtype=torch.bfloat16, layout: str = "absorbed",
             context: int = 4096, gqa_groups: int = 8, include_mtp: bool = False) -> dict:
    """Tokens a KV budget holds, and how many requests of ``context`` tokens fit at once (what
    vLLM logs as "KV cache size: N tokens" and "Maximum concurrency ... : x")."""
    per = bytes_per_token(cfg, dtype, layout, include_mtp, gqa_groups)
    tokens = int(budget_bytes // per)
    return dict(bytes_per_token=per, tokens=tokens, requests=tokens // context,
                concurrency=tokens / context, context=context, budget_bytes=budget_bytes)


def report_bytes_per_token(name: str, dtype=torch.bfloat16) -> int:
    m = REPORT_MODELS[name]
    if m["kind"] == "mla":
        per_layer = m["kv_lora_rank"] + m["qk_rope_head_dim"]
    else:
        per_layer = 2 * m["num_key_value_heads"] * m["head_dim"]
    return m["num_hidden_layers"] * per_layer * dtype_bytes(dtype)


def kv_comparison(dtype=torch.bfloat16) -> list[dict]:
    """The report's comparison (ISCA '25 Table 1): bytes per token, computed ratio to V3 and the
    multiplier as the ISCA paper prints it."""
    v3 = report_bytes_per_token("DeepSeek-V3", dtype)
    rows = []
    for name, m in REPORT_MODELS.items():
        b = report_bytes_per_token(name, dtype)
        if m["kind"] == "mla":
            layout = f"MLA, {m['num_hidden_layers']} x ({m['kv_lora_rank']} + {m['qk_rope_head_dim']})"
        else:
            layout = f"GQA, {m['num_hidden_layers']} x {m['num_key_value_heads']} x {m['head_dim']} x 2"
        rows.append(dict(model=name, layout=layout, bytes_per_token=b, ratio=b / v3,
                         printed=m["printed_ratio"] or "1x"))
    return rows
