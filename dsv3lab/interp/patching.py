"""Activation patching between a clean and a corrupted prompt, at any hook point, with the
logit-difference metric (Meng et al.'s causal tracing / Wang et al.'s IOI recipe).

    metric = logit_diff(answer_id, wrong_id)                 # logits -> [batch], at the last position
    res = activation_patching(model, clean, corrupt, metric, hook="resid_pre")
    res.scores            # [n_layers, S]: metric with (layer, position) taken from the clean run,
                          # normalised: 0 = the corrupted run, 1 = the clean run
    res = expert_patching(model, clean, corrupt, metric)     # [moe_layers, E]: one expert at a time

``hook`` is a short name -- ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``
([B,S,D]); ``routed_out``, ``shared_out`` ([T,D], MoE blocks only); ``kv_latent`` (the cached,
normalised MLA latent c_kv [B,S,r]), ``k_pe``, ``q_nope``, ``q_pe``, ``attn_heads`` (per-head outputs
before o_proj) -- or any hook-name template with ``{L}`` for the block index
(``"layers.{L}.mlp.hook_routed_out"``). Patching c_kv at position p changes the keys *and*
values every later query reads at p, which is what MLA caches; the queries at p are untouched.

An individual routed expert is patched through its contribution, since the clean and corrupted
runs may route a token differently: the corrupted routed sum gets expert e's corrupted
contribution (w_e * Expert_e(x), zero where e was not chosen) replaced by its clean one, both read
from ``MoE.hook_expert_out`` and the gate's weights. Positions are batched: one forward per layer
(or per group of experts) runs every patched position as its own batch row -- exact, because
attention and routing never mix batch rows (no capacity limit, no dropped tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from dsv3lab.probes import hook_points, hooks, run_with_cache

SHORT_HOOKS = {
    "resid_pre": "layers.{L}.hook_resid_pre",
    "resid_mid": "layers.{L}.hook_resid_mid",
    "resid_post": "layers.{L}.hook_resid_post",
    "attn_out": "layers.{L}.hook_attn_out",
    "mlp_out": "layers.{L}.hook_mlp_out",
    "routed_out": "layers.{L}.mlp.hook_routed_out",
    "shared_out": "layers.{L}.mlp.hook_shared_out",
    "kv_latent": "layers.{L}.self_attn.hook_kv_latent",
    "k_pe": "layers.{L}.self_attn.hook_k_pe",
    "q_nope": "layers.{L}.self_attn.hook_q_nope",
    "q_pe": "layers.{L}.self_attn.hook_q_pe",
    "attn_heads": "layers.{L}.self_attn.hook_out",
}


def logit_diff(answer: int, wrong: int, position: int = -1) -> Callable[[torch.Tensor], torch.Tensor]:
    """metric(logits [B,S,V]) -> [B]: logit(answer) - logit(wrong) at ``position``."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        lg = logits[:, position].float()
        return lg[:, answer] - lg[:, wrong]
    metric.__name__ = f"logit_diff({answer}, {wrong})"
    return metric


@dataclass
class PatchResult:
    scores: torch.Tensor        # [rows, cols] normalised: (patched - corrupt) / (clean - corrupt)
    raw: torch.Tensor           # [rows, cols] metric of each patched run
    clean: float                # metric of the clean run
    corrupt: float              # metric of the corrupted run
    rows: list                  # block indices (or MoE block indices)
    cols: list                  # positions (or expert ids)
    hook: str


def _template(hook: str) -> str:
    t = SHORT_HOOKS.get(hook, hook)
    if "{L}" not in t:
        raise ValueError(f"hook {hook!r}: give a short name ({', '.join(SHORT_HOOKS)}) or a template with {{L}}")
    return t


def _check_pair(model, clean: torch.Tensor, corrupt: torch.Tensor):
    if clean.dim() != 2 or clean.shape[0] != 1 or clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupted prompts must both be [1, S] of one length; got "
                         f"{tuple(clean.shape)} and {tuple(corrupt.shape)}")
    model.check_tokens(clean)
    model.check_tokens(corrupt)


def _normalise(raw, clean_m, corrupt_m):
    denom = clean_m - corrupt_m
    if abs(denom) < 1e-12:
        raise ValueError(f"the metric is the same on the clean and corrupted prompts ({clean_m:.4g}): "
                         "nothing to recover")
    return (raw - corrupt_m) / denom


def token_major(point) -> bool:
    """Whether a hook point's tensor is [T,...] (True) or [B,S,...] (False), from its documented
    shape; anything else (attention probabilities [B,H,S,T], counts [E]) has no position axis to
    patch along."""
    shape = point.shape.replace(" ", "")
    if shape.startswith("[T,"):
        return True
    if shape.startswith("[B,S"):
        return False
    raise ValueError(f"hook point with shape {point.shape!r} has no [B,S] or [T] position axis to patch")


@torch.no_grad()
def patched_run(model, tokens: torch.Tensor, source_cache: dict, names: Sequence[str],
                positions: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``model(tokens)`` with the activations at ``names`` replaced by ``source_cache``'s (a
    ``run_with_cache`` of a prompt of the same shape) at ``positions`` (all when None). Returns the
    logits."""
    B, S = tokens.shape
    points = hook_points(model)
    layout = {n: token_major(points[n]) for n in names}

    def patch(t, name):
        src = source_cache[name].to(t.device, t.dtype)
        if positions is None:
            return src.clone()
        view = t.view(B, S, *t.shape[1:]) if layout[name] else t
        s = src.view(B, S, *src.shape[1:]) if layout[name] else src
        out = view.clone()
        out[:, list(positions)] = s[:, list(positions)]
        return out.view(t.shape)

    with hooks(model, [(list(names), patch)]):
        return model(tokens)


@torch.no_grad()
def activation_patching(model, clean: torch.Tensor, corrupt: torch.Tensor, metric: Callable,
                        hook: str = "resid_pre", layers: Optional[Sequence[int]] = None,
                        positions: Optional[Sequence[int]] = None, batch_size: int = 32,
                        progress: bool = False) -> PatchResult:
    """Patch ``hook`` of each (layer, position) from the clean run into the corrupted run, one at a
    time, and record the normalised metric [layers, positions] (module docstring)."""
    _check_pair(model, clean, corrupt)
    template = _template(hook)
    S = clean.shape[1]
    points = hook_points(model)
    if layers is None:
        layers = [i for i in range(len(model.layers)) if template.format(L=i) in points]
    names = [template.format(L=l) for l in layers]
    missing = [n for n in names if n not in points]
    if missing:
        raise ValueError(f"no hook point {missing[0]} (dense block, or a typo); see dsv3lab.probes.hook_names(model)")
    positions = list(range(S)) if positions is None else [p % S for p in positions]
    clean_logits, cache = run_with_cache(model, clean, names)
    corrupt_logits = model(corrupt)
    clean_m, corrupt_m = float(metric(clean_logits)[0]), float(metric(corrupt_logits)[0])
    raw = torch.zeros(len(layers), len(positions))
    it = list(enumerate(names))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"patching {hook}", leave=False)
    for li, name in it:
        for lo in range(0, len(positions), batch_size):
            chunk = positions[lo:lo + batch_size]
            n = len(chunk)
            batch = corrupt.expand(n, S)
            src = cache[name]
            tok_major = token_major(points[name])
            src_bs = src.view(1, S, *src.shape[1:]) if tok_major else src
            rows = torch.arange(n)
            pos = torch.tensor(chunk)

            def patch(t, _name, src_bs=src_bs, rows=rows, pos=pos, tok_major=tok_major, n=n):
                view = t.view(n, S, *t.shape[1:]) if tok_major else t
                out = view.clone()
                out[rows, pos] = src_bs[0, pos].to(out.device, out.dtype)
                return out.view(t.shape)

            with hooks(model, [(name, patch)]):
                raw[li, lo:lo + n] = metric(model(batch)).float().cpu()
    return PatchResult(_normalise(raw, clean_m, corrupt_m), raw, clean_m, corrupt_m, list(layers), positions, hook)


def _contribution(ids, weights, outs, experts, n, S):
    """[n*S, D] fp32: per batch row i, expert experts[i]'s weighted output (0 where not chosen).
    ids/weights [n*S, k], outs [n*S, k, D]; ``experts`` [n]."""
    e = experts.repeat_interleave(S).to(ids.device)[:, None]                     # [n*S, 1]
    hit = (ids == e).float() * weights.float()                                     # [n*S, k]
    return (outs.float() * hit[..., None]).sum(1)


@torch.no_grad()
def expert_patching(model, clean: torch.Tensor, corrupt: torch.Tensor, metric: Callable,
                    layers: Optional[Sequence[int]] = None, experts: Optional[Sequence[int]] = None,
                    positions: Optional[Sequence[int]] = None, batch_size: int = 32,
                    progress: bool = False) -> PatchResult:
    """Patch one routed expert's contribution (clean into corrupted) at a time: [moe_layers, E]
    normalised metric. ``positions``: where to patch (all by default)."""
    _check_pair(model, clean, corrupt)
    moe = [blk.layer for blk in model.layers if hasattr(blk.mlp, "gate")]
    layers = moe if layers is None else list(layers)
    bad = [l for l in layers if l not in moe]
    if bad:
        raise ValueError(f"expert_patching: layers {bad} are not MoE blocks (MoE blocks: {moe})")
    E = model.cfg.n_routed_experts
    experts = list(range(E)) if experts is None else list(experts)
    S = clean.shape[1]
    pos_mask = torch.zeros(S, dtype=torch.bool)
    pos_mask[list(range(S)) if positions is None else [p % S for p in positions]] = True
    names = []
    for l in layers:
        names += [f"layers.{l}.mlp.gate.hook_topk_ids", f"layers.{l}.mlp.gate.hook_topk_weights",
                  f"layers.{l}.mlp.hook_expert_out"]
    clean_logits, cache = run_with_cache(model, clean, names)
    corrupt_logits = model(corrupt)
    clean_m, corrupt_m = float(metric(clean_logits)[0]), float(metric(corrupt_logits)[0])
    raw = torch.zeros(len(layers), len(experts))
    it = list(enumerate(layers))
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="patching experts", leave=False)
    for li, l in it:
        pre = f"layers.{l}.mlp."
        c_ids, c_w, c_out = (cache[pre + "gate.hook_topk_ids"], cache[pre + "gate.hook_topk_weights"],
                             cache[pre + "hook_expert_out"])
        for lo in range(0, len(experts), batch_size):
            chunk = torch.tensor(experts[lo:lo + batch_size])
            n = len(chunk)
            clean_c = _contribution(c_ids.repeat(n, 1), c_w.repeat(n, 1), c_out.repeat(n, 1, 1), chunk, n, S)
            got: dict = {}
            mask = pos_mask.repeat(n)[:, None]

            def keep(t, name, got=got):
                got[name.rsplit(".", 1)[-1]] = t
                return None

            def replace(t, name, got=got, clean_c=clean_c, chunk=chunk, n=n, mask=mask):
                corrupt_c = _contribution(got["hook_topk_ids"], got["hook_topk_weights"], got["hook_expert_out"],
                                          chunk, n, S)
                delta = (clean_c.to(t.device) - corrupt_c).masked_fill(~mask.to(t.device), 0.0)
                return (t.float() + delta).to(t.dtype)

            with hooks(model, [([pre + "gate.hook_topk_ids", pre + "gate.hook_topk_weights",
                                 pre + "hook_expert_out"], keep), (pre + "hook_routed_out", replace)]):
                raw[li, lo:lo + n] = metric(model(corrupt.expand(n, S))).float().cpu()
    return PatchResult(_normalise(raw, clean_m, corrupt_m), raw, clean_m, corrupt_m, layers, experts, "expert")
