"""Model construction: a freshly initialised model from a config or preset name (``dsv3lab.build``).

N(0, initializer_range) weights, unit norms, zero biases, the same weights for the same seed on
every machine (drawn in fp32 on the CPU, then cast and moved). ``device="meta"`` allocates
nothing: the 671B preset builds in seconds for counting. DeepSeek-V4 configs and presets build
``V4Transformer`` (``build_v4``); every other config the V3 ``Transformer``.
"""

from __future__ import annotations

import torch

from dsv3lab.config import ModelConfig, V4Config
from dsv3lab.family import is_v4
from dsv3lab.model.transformer import Transformer


def _default_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def build(cfg: ModelConfig | str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0,
          attn_mode: str | None = None) -> Transformer:
    """A freshly initialised model (N(0, initializer_range) weights, unit norms, zero bias).
    ``device="meta"`` allocates nothing: the 671B preset builds in seconds for counting."""
    if is_v4(cfg):
        from dsv3lab.family import check_v4_options
        check_v4_options(attn_mode=attn_mode, where="build")
        return build_v4(cfg, device=device, dtype=dtype, seed=seed)
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    dtype = dtype or _default_dtype(device)
    if torch.device(device).type == "meta":
        return Transformer(cfg, dtype, "meta").set_attn_mode(attn_mode)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, dtype, "meta")
    model.to_empty(device="cpu")
    std = cfg.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("norm.bias"):         # LayerNorm bias (the indexer's k_norm)
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        for name, b in model.named_buffers():
            b.zero_()
    model.to(device)
    return model.set_attn_mode(attn_mode).eval()


def build_v4(cfg: V4Config | str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0):
    """A V4 model with N(0, initializer_range) weights, unit norms, zero sinks/biases/position
    biases, the mHC scales at 1 and a random token -> experts table (meta: nothing allocated)."""
    from dsv3lab.model.v4_transformer import V4Transformer
    if isinstance(cfg, str):
        cfg = V4Config.preset(cfg)
    dtype = dtype or _default_dtype(device)
    if torch.device(device).type == "meta":
        return V4Transformer(cfg, dtype, "meta")
    g = torch.Generator().manual_seed(seed)
    model = V4Transformer(cfg, dtype, "meta")
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_hc.scale") or name.endswith("hc_head.hc_scale"):
                p.fill_(1.0)
            elif name.endswith((".sinks", "position_bias", "_hc.base", "hc_head.hc_base")):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * cfg.initializer_range)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
                b.copy_(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(b.shape[0])]))
            else:
                b.zero_()
    return model.to(device).eval()
