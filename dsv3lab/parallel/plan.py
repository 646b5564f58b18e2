"""Deployment planning without hardware: place one rank's share of the model on the meta device.

``plan(cfg, gpus, gpu_mem_gb, tp=, ep=, dp=)`` builds the model on meta, applies the layout for
rank 0 exactly as a real rank would (``apply_layout``; ranks are symmetric, so rank 0 stands for
all), adds the redundant expert slots if asked, and counts the tensors it placed:

  weight bytes per rank   bf16: the engine's tensors as placed (the gate stays fp32, as the
                          engine keeps it); fp8: the same model with every FP8-eligible Linear
                          (docs/references.md#fp8-blocks) converted to e4m3 plus its fp32 [ceil(out/128), ceil(in/128)]
                          weight_scale_inv, computed from *this rank's* slice
  KV cache per rank       usable = gpu_mem * mem_util - reserve - weights; the absorbed latent
                          cache ((kv_lora_rank + rope) x layers x 2 B per token) is replicated over
                          the TP group, so each rank holds its DP group's whole cache: tokens per
                          rank = usable / bytes per token; concurrent requests = tokens // context
                          per DP group, x dp for the deployment
  all-to-all bytes        per token per MoE layer, one copy per (token, expert) pair, dispatch +
                          combine, times (ep-1)/ep (the expected off-rank share under uniform
                          routing): the engine sends activations (bf16) both ways; DeepSeek's
                          production sends FP8 + 1x128 scales out and BF16 back (report sec. 3.3.3,
                          Day 6; docs/references.md#deployment)
  fits                    weights fit in usable memory and at least one request of ``context``
                          tokens fits in the KV cache

GB here is 10^9 bytes (an H200 is 141 GB, an H800 80 GB).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from dsv3lab.checkpoint.keys import hf_key, is_fp8_key
from dsv3lab.config import ModelConfig
from dsv3lab.model.build import build
from dsv3lab.model.layers import MLP, Linear
from dsv3lab.model.moe import MoE
from dsv3lab.parallel.apply import apply_layout
from dsv3lab.parallel.layout import Layout
from dsv3lab.stats import kv_cache_bytes_per_token

_DT = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def _nbytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def to_fp8_meta(model, block: int = 128) -> nn.Module:
    """Turn every FP8-eligible Linear of a meta model into e4m3 + weight_scale_inv (meta)."""
    cfg = model.cfg
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.weight.is_meta and mod.weight.dtype != torch.float8_e4m3fn:
            key = hf_key(cfg, name + ".weight") if not name.startswith("_expert_slots") else \
                "model.layers.0.mlp.experts.0.down_proj.weight"
            if is_fp8_key(key):
                out_f, in_f = mod.weight.shape
                mod.weight = nn.Parameter(torch.empty(out_f, in_f, dtype=torch.float8_e4m3fn, device="meta"),
                                          requires_grad=False)
                mod.register_buffer("weight_scale_inv", torch.empty(math.ceil(out_f / block), math.ceil(in_f / block),
                                                                    dtype=torch.float32, device="meta"))
    return model


def place(cfg: ModelConfig, layout: Layout, rank: int = 0, redundant_experts: int = 0) -> nn.Module:
    """Rank ``rank``'s model on meta (bf16), as ``apply_layout`` places it. With redundant experts
    (EPLB-style replicas; the engine itself has none, so this is placement only) every rank holds
    (E + R) / ep physical expert slots per MoE layer, in ``model._expert_slots``, instead of its
    E / ep logical experts."""
    layout.validate(cfg, redundant_experts=redundant_experts)
    model = build(cfg, device="meta", dtype=torch.bfloat16)
    if not redundant_experts:
        return apply_layout(model, layout, rank)
    apply_layout(model, dataclasses.replace(layout, ep=1), rank)
    slots = 0
    for blk in list(model.layers) + list(model.mtp):
        if isinstance(blk.mlp, MoE):
            for e in range(cfg.n_routed_experts):
                blk.mlp.experts[e] = None
            slots += (cfg.n_routed_experts + redundant_experts) // layout.ep
    model._expert_slots = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size, torch.bfloat16, "meta")
                                        for _ in range(slots))
    return model


def a2a_bytes_per_token(cfg: ModelConfig, ep: int, dispatch_bytes: float = 2, combine_bytes: float = 2,
                        dispatch_scales: bool = False) -> float:
    """Expected all-to-all bytes per token per MoE layer: one copy of the hidden state per
    (token, expert) pair out (dispatch) and back (combine), for the (ep-1)/ep of pairs whose
    expert lives on another rank under uniform routing."""
    if not cfg.has_moe or ep <= 1:
        return 0.0
    D = cfg.hidden_size
    per_pair = D * dispatch_bytes + (math.ceil(D / 128) * 4 if dispatch_scales else 0) + D * combine_bytes
    return cfg.num_experts_per_tok * per_pair * (ep - 1) / ep


def plan(cfg: ModelConfig | str, gpus: int, gpu_mem_gb: float, tp: int | None = None, ep: int | None = None,
         dp: int | None = None, context: int = 4096, weights: str = "fp8", redundant_experts: int = 0,
         mtp: bool = True, mem_util: float = 0.9, reserve_gb: float = 0.0, kv_dtype=torch.bfloat16,
         return_model: bool = False) -> dict:
    """Per-rank memory, KV capacity and all-to-all volume of a deployment (see module doc)."""
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    if weights not in _DT:
        raise ValueError(f"weights must be 'fp8' or 'bf16', got {weights!r}")
    if gpu_mem_gb <= 0:
        raise ValueError(f"gpu_mem_gb must be > 0, got {gpu_mem_gb}")
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    if not mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    layout = Layout.make(gpus, tp=tp, ep=ep, dp=dp)
    model = place(cfg, layout, 0, redundant_experts)
    bytes_bf16 = _nbytes(model)
    to_fp8_meta(model, cfg.fp8_block_size or 128)
    bytes_fp8 = _nbytes(model)
    w = bytes_fp8 if weights == "fp8" else bytes_bf16

    kv_per_token = kv_cache_bytes_per_token(cfg, kv_dtype, include_mtp=mtp)
    usable = gpu_mem_gb * 1e9 * mem_util - reserve_gb * 1e9
    free = usable - w
    kv_tokens = int(max(0, free) // kv_per_token)
    req_per_group = kv_tokens // context
    ep = layout.ep
    a2a_engine = a2a_bytes_per_token(cfg, ep)
    a2a_fp8 = a2a_bytes_per_token(cfg, ep, 1, 2, dispatch_scales=True)
    experts = (cfg.n_routed_experts + redundant_experts) // ep if cfg.has_moe else 0
    out = dict(
        model=cfg.name, gpus=gpus, gpu_mem_gb=gpu_mem_gb, mem_util=mem_util, reserve_gb=reserve_gb,
        layout=dict(tp=layout.tp, ep=layout.ep, dp=layout.dp, world_size=layout.world_size),
        weights=weights, mtp=bool(cfg.num_nextn_predict_layers),
        weight_bytes_per_rank=int(w), weight_bytes_per_rank_bf16=int(bytes_bf16),
        weight_bytes_per_rank_fp8=int(bytes_fp8),
        routed_experts_per_rank=experts, redundant_experts=redundant_experts,
        heads_per_rank=cfg.num_attention_heads // layout.tp, vocab_rows_per_rank=cfg.vocab_size // layout.tp,
        usable_bytes_per_rank=int(usable), kv_cache_bytes_per_token=int(kv_per_token),
        kv_cache_bytes_per_rank=int(max(0, free)), kv_cache_tokens_per_rank=kv_tokens,
        kv_cache_tokens_total=kv_tokens * layout.dp, context=context,
        concurrent_requests_per_dp_group=int(req_per_group), concurrent_requests_total=int(req_per_group * layout.dp),
        a2a_bytes_per_token_per_moe_layer=float(a2a_engine),
        a2a_bytes_per_token_per_moe_layer_fp8_dispatch=float(a2a_fp8),
        moe_layers=cfg.n_moe_layers, fits=bool(w <= usable and kv_tokens >= context),
    )
    if return_model:
        out["_model"] = model
    return out


def format_plan(p: dict) -> str:
    G = 1e9
    lay = p["layout"]
    lines = [
        f"{p['model']} on {p['gpus']} GPU(s) x {p['gpu_mem_gb']:g} GB (using {p['mem_util']:.0%}"
        + (f", {p['reserve_gb']:g} GB reserved" if p["reserve_gb"] else "") + f"), weights {p['weights']}"
        + (" + MTP" if p["mtp"] else ""),
        f"  layout                 tp={lay['tp']} dp={lay['dp']} ep={lay['ep']}: {p['heads_per_rank']} heads, "
        f"{p['vocab_rows_per_rank']} vocab rows, {p['routed_experts_per_rank']} routed experts per rank per MoE layer"
        + (f" ({p['redundant_experts']} redundant slots in all)" if p["redundant_experts"] else ""),
        f"  weights / rank         {p['weight_bytes_per_rank'] / G:10.2f} GB   (bf16 {p['weight_bytes_per_rank_bf16'] / G:.2f} GB, "
        f"fp8+scales {p['weight_bytes_per_rank_fp8'] / G:.2f} GB)",
        f"  KV cache / rank        {p['kv_cache_bytes_per_rank'] / G:10.2f} GB   = {p['kv_cache_tokens_per_rank']:,} tokens "
        f"at {p['kv_cache_bytes_per_token']:,} B/token (latent{', the MTP layers included' if p['mtp'] else ''}, "
        "replicated over TP)",
        f"  requests at {p['context']:,} ctx  {p['concurrent_requests_per_dp_group']:,} per DP group, "
        f"{p['concurrent_requests_total']:,} in all ({p['kv_cache_tokens_total']:,} tokens)",
        f"  all-to-all / token     {p['a2a_bytes_per_token_per_moe_layer']:,.0f} B per MoE layer (bf16 both ways), "
        f"{p['a2a_bytes_per_token_per_moe_layer_fp8_dispatch']:,.0f} B with FP8 dispatch; x{p['moe_layers']} layers",
        f"  fits                   {'yes' if p['fits'] else 'NO'}",
    ]
    return "\n".join(lines)
