"""Hook points: the names, a cache of activations, and a context that always removes its hooks.

Every ``HookPoint`` in the model (``dsv3lab/model/layers.py``) is an identity module at a stable
dotted name; its constructor string documents the shape that passes through. ``hook_names(model)``
lists them from the modules themselves, so the table below can never drift from the code by more
than this docstring (``tests/test_probes.py`` checks it does not). L is a block index, K an MTP
depth; T = B*S tokens in batch-major order.

  name                                     shape
  hook_embed                               [B,S,D] token embeddings
  layers.L.hook_resid_pre                  [B,S,D] residual stream into the block
  layers.L.self_attn.hook_q_nope           [B,S,H,qk_nope]
  layers.L.self_attn.hook_q_pe             [B,S,H,qk_rope] rotated
  layers.L.self_attn.hook_kv_latent        [B,S,kv_lora_rank] post-norm c_kv (what is cached)
  layers.L.self_attn.hook_k_pe             [B,S,qk_rope] rotated shared key (what is cached)
  layers.L.self_attn.hook_attn_probs       [B,H,S,T] softmax probabilities (computed only when hooked)
  layers.L.self_attn.hook_out              [B,S,H*v] per-head outputs before o_proj
  layers.L.hook_attn_out                   [B,S,D] attention output (after o_proj)
  layers.L.hook_resid_mid                  [B,S,D] residual after attention
  layers.L.mlp.gate.hook_logits            [T,E] router logits u (fp32)             (MoE blocks)
  layers.L.mlp.gate.hook_scores            [T,E] scores s: sigmoid(u) or softmax(u)
  layers.L.mlp.gate.hook_biased_scores     [T,E] selection scores s + b
  layers.L.mlp.gate.hook_group_mask        [T,G] bool, groups kept (fires only when G > topk_group)
  layers.L.mlp.gate.hook_topk_ids          [T,k] int64 chosen experts
  layers.L.mlp.gate.hook_topk_weights      [T,k] fp32 routing weights
  layers.L.mlp.hook_expert_counts          [E] int64 tokens routed to each expert in this call
  layers.L.mlp.hook_routed_out             [T,D] weighted sum of routed experts
  layers.L.mlp.hook_shared_out             [T,D] shared experts' output
  layers.L.mlp.hook_expert_out             [T,k,D] each chosen expert's output, unweighted, slot order of topk_ids
  layers.L.hook_mlp_out                    [B,S,D] FFN / MoE output
  layers.L.hook_resid_post                 [B,S,D] residual out of the block
  mtp.K.hook_h_in                          [B,S,D] hidden state from the previous depth
  mtp.K.<every block hook above>           (the MTP block is a full MoE block)
  mtp.K.hook_mtp_out                       [B,S,D] block output before shared_head.norm
  hook_final                               [B,S,D] hidden state after the last block, before the final norm
  hook_logits                              [B,S,V] logits

Hooks here are plain ``fn(tensor, name)`` callables: return None to observe, or a tensor to
replace the activation (ablations, patching). ``hooks(...)`` removes every handle it made when the
``with`` block ends, exceptions included. A HookPoint with nothing attached is one extra module
call (``dsv3lab bench hooks`` measures it).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import Callable, Iterable, Union

import torch
from torch import nn

from dsv3lab.model.layers import HookPoint

NameFilter = Union[str, Callable[[str], bool], Iterable[str], None]


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """name -> HookPoint module, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HookPoint)}


def hook_names(model: nn.Module) -> dict[str, str]:
    """name -> documented shape, generated from the model's HookPoint modules."""
    return {name: m.shape for name, m in hook_points(model).items()}


def hook_table(model: nn.Module) -> dict[str, str]:
    """``hook_names`` with block indices folded to ``L`` and MTP depths to ``K`` (one row each)."""
    out: dict[str, str] = {}
    for name, shape in hook_names(model).items():
        generic = re.sub(r"^layers\.\d+\.", "layers.L.", name)
        generic = re.sub(r"^mtp\.\d+\.", "mtp.K.", generic)
        out.setdefault(generic, shape)
    return out


def _matcher(names_filter: NameFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda n: True
    if callable(names_filter):
        return names_filter
    if isinstance(names_filter, str):
        pats = [names_filter]
    else:
        pats = list(names_filter)

    def match(n: str) -> bool:
        return any(n == p or fnmatch.fnmatchcase(n, p) for p in pats)
    return match


def matching_names(model: nn.Module, names_filter: NameFilter) -> list[str]:
    """Hook names selected by an exact name, a glob (``layers.*.mlp.gate.hook_scores``), a list of
    those, or a predicate. Raises if nothing matches (a typo should not silently record nothing)."""
    names = [n for n in hook_points(model) if _matcher(names_filter)(n)]
    if not names:
        raise KeyError(f"no hook point matches {names_filter!r}; see dsv3lab.probes.hook_names(model)")
    return names


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: list[tuple[NameFilter, Callable]]):
    """``with hooks(model, [("layers.1.hook_resid_post", fn), (pred, fn2)]): model(tokens)``.

    ``fn(tensor, name)`` returns None (observe) or a replacement tensor. Handles are removed on
    exit, also when the body raises."""
    points = hook_points(model)
    handles = []
    try:
        for flt, fn in fwd_hooks:
            for name in matching_names(model, flt):
                def _hook(module, inputs, output, _fn=fn, _name=name):
                    return _fn(output, _name)
                handles.append(points[name].register_forward_hook(_hook))
        yield model
    finally:
        for h in handles:
            h.remove()


def run_with_cache(model: nn.Module, tokens: torch.Tensor, names_filter: NameFilter = None,
                   detach: bool = True, device=None, mtp: bool = False, **forward_kw):
    """Run ``model(tokens, **forward_kw)`` and return ``(logits, cache)``; cache maps hook name ->
    tensor (detached, optionally moved to ``device``). A hook that fires more than once in the
    call (none do in a plain forward) keeps a list of its tensors.

    ``mtp=True`` also runs the MTP depths on the same tokens (position i predicts i+1+k), so the
    ``mtp.K.*`` hook points fire; their logits go in ``cache["mtp_logits"]`` (a list)."""
    selected = matching_names(model, names_filter)
    cache: dict[str, object] = {}

    def save(t, name):
        if isinstance(t, torch.Tensor):
            t = t.detach() if detach else t
            if device is not None:
                t = t.to(device)
        if name in cache:
            prev = cache[name]
            cache[name] = (prev if isinstance(prev, list) else [prev]) + [t]
        else:
            cache[name] = t
        return None

    ctx = torch.no_grad() if detach else contextlib.nullcontext()
    with ctx, hooks(model, [(selected, save)]):
        if mtp and len(getattr(model, "mtp", [])):
            logits, h = model(tokens, return_hidden=True, **forward_kw)
            start = forward_kw.get("start", 0)
            cache["mtp_logits"] = model.mtp_logits(h[:, :-1], tokens[:, 1:], start=start)
        else:
            logits = model(tokens, **forward_kw)
    return logits, cache
