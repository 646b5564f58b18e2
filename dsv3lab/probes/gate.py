"""The router seen from outside the model: find its gates, neutralise their bias, and recompute
it step by step from its weights (DeepSeek-V3 report, sec. 2.1.2).

``moe_gates(model)`` lists every routed gate (main blocks, then MTP blocks); ``biases_zeroed``
is a ``with`` block that zeroes their selection biases and restores them after, to see routing
without the aux-loss-free correction. ``gate_steps`` returns every intermediate the notebook shows; ``check_gate`` runs the model with
hooks on one MoE block, feeds the hooked residual through the block's own norm weights, recomputes
each step here and compares it with the gate's hook points. This is explanation code (the
independent check in the tests is written separately from this file and from ``moe.Gate``).
"""

from __future__ import annotations

import contextlib

import torch

from dsv3lab.model.moe import Gate
from dsv3lab.probes.hooks import run_with_cache


def moe_gates(model) -> list[Gate]:
    """Every routed gate of the model, main blocks then MTP blocks (each has its own bias)."""
    return [m for m in model.modules() if isinstance(m, Gate)]


def named_moe_gates(model) -> list[tuple[str, Gate]]:
    """(module name, gate) for every routed gate, in ``moe_gates`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Gate)]


@contextlib.contextmanager
def biases_zeroed(model):
    """Zero every gate's selection bias ``e_score_correction_bias`` inside the block (main and
    MTP gates; gates without a bias are left alone); restore the exact values after, exceptions
    included."""
    gates = [g for g in moe_gates(model) if g.has_bias]
    saved = [g.e_score_correction_bias.clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.e_score_correction_bias.zero_()
        yield model
    finally:
        with torch.no_grad():
            for g, b in zip(gates, saved):
                g.e_score_correction_bias.copy_(b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@torch.no_grad()
def gate_steps(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E, cfg) -> dict:
    """x [T,D] -> dict of logits, scores, biased_scores, group_scores [T,G], group_mask [T,G],
    masked [T,E], topk_ids [T,k], raw_weights (unbiased s of the chosen), topk_weights."""
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    u = x_TD.float() @ weight_ED.float().T
    s = torch.sigmoid(u) if cfg.scoring_func == "sigmoid" else torch.softmax(u, dim=-1)
    sel = s + bias_E.float() if bias_E is not None else s
    per = E // G
    grouped = sel.view(-1, G, per)
    # a group's score: the sum of its best two (noaux_tc, Mistral 4's group_top2) or its best one
    # (V2's group_limited_greedy); "greedy" (V2-Lite, transformers' DeepseekV2TopkRouter) has no
    # group limit whatever n_group says, so every group is kept
    if cfg.topk_method in ("noaux_tc", "group_top2"):
        group_scores = grouped.topk(min(2, per), dim=-1).values.sum(-1)
    else:
        group_scores = grouped.amax(-1)
    if cfg.topk_method == "greedy" or cfg.topk_group >= G:
        group_mask = torch.ones_like(group_scores, dtype=torch.bool)
    else:
        kept = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    masked = sel.masked_fill(~group_mask.repeat_interleave(per, dim=1), float("-inf"))
    ids = masked.topk(k, dim=-1).indices
    raw = s.gather(1, ids)
    w = raw / raw.sum(-1, keepdim=True) if (cfg.norm_topk_prob and k > 1) else raw
    return dict(logits=u, scores=s, biased_scores=sel, group_scores=group_scores, group_mask=group_mask,
                masked=masked, topk_ids=ids, raw_weights=raw, topk_weights=w * cfg.routed_scaling_factor)


@torch.no_grad()
def check_gate(model, tokens: torch.Tensor, layer: int) -> tuple[dict, list[dict]]:
    """Recompute block ``layer``'s routing from the hooked residual; return (steps, rows) where
    each row compares one step with the gate's hook point (max |diff| or ids equal)."""
    blk = model.layers[layer]
    gate = blk.mlp.gate
    pre = f"layers.{layer}."
    names = [pre + "hook_resid_mid"] + [pre + f"mlp.gate.hook_{n}" for n in
                                        ("logits", "scores", "biased_scores", "group_mask", "topk_ids", "topk_weights")]
    _, cache = run_with_cache(model, tokens, [n for n in names])
    h = cache[pre + "hook_resid_mid"]
    x = rms_norm(h, blk.post_attention_layernorm.weight, blk.post_attention_layernorm.eps).reshape(-1, h.shape[-1])
    steps = gate_steps(x, gate.weight, gate.e_score_correction_bias, model.cfg)
    rows = []
    for key in ("logits", "scores", "biased_scores", "group_mask", "topk_ids", "topk_weights"):
        hooked = cache.get(pre + f"mlp.gate.hook_{key}")
        if hooked is None:
            rows.append(dict(step=key, shape="-", match="hook did not fire (no group limit)"))
            continue
        mine = steps[key]
        if mine.dtype in (torch.bool, torch.int64):
            ok = bool(torch.equal(mine, hooked))
            rows.append(dict(step=key, shape=list(mine.shape), match="equal" if ok else "DIFFERENT"))
        else:
            d = float((mine - hooked).abs().max())
            rows.append(dict(step=key, shape=list(mine.shape), match=f"max |diff| {d:.1e}"))
    return steps, rows
