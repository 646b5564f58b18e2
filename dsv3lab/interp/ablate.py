"""Expert ablation: remove experts from chosen MoE layers, two ways, and measure what each is worth.

    with dsv3lab.ablate_experts(model, {3: [5, 17]}, mode="reroute"):
        model(tokens)          # layer 3 routes as if experts 5 and 17 did not exist
    with dsv3lab.ablate_experts(model, {3: [5, 17]}, mode="zero"):
        model(tokens)          # layer 3 routes as trained; 5's and 17's outputs are dropped

``reroute`` masks the experts in the gate (``Gate.expert_mask``): their selection scores become
-inf before the group step, so with group-limited routing (noaux_tc, DeepSeek-V3 report sec.
2.1.2) a group's score is the sum of its best two *remaining* experts and an emptied group is never
kept; each token then takes the next-best experts of the kept groups, and the weights are the
unbiased scores of what was chosen, renormalised over them (for the sigmoid gate). This is the
router of a model whose experts were pruned. ``zero`` keeps the routing (ids and weights as the
gate chose them, so the other experts' weights are *not* renormalised) and replaces the ablated
experts' outputs by zeros on ``MoE.hook_expert_out``: the token simply loses that share of its
FFN update. The two answer different questions -- "can the rest of the model cover for expert e?"
against "how much does the output lean on e where it is used?".

Layer indices are the model's block indices (``model.layers.{i}``); dense blocks have no experts.
A reroute that could leave a token fewer than top_k selectable experts in its kept groups is
refused up front (the top-k would otherwise pick a masked -inf expert). Under ``replay`` the gate's
choice is forced, so a reroute mask has no effect there (zeroing still does).

``expert_importance(model, windows)`` ablates each expert of each MoE layer alone and reports the
change in next-token loss over the windows, resuming the forward at the ablated block from a cached
residual (the blocks before it are unchanged) and running several ablations as batch copies.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from dsv3lab.probes import hooks, run_with_cache


def moe_layers(model) -> list[int]:
    return [blk.layer for blk in model.layers if hasattr(blk.mlp, "gate")]


def _check(model, experts: Mapping[int, Iterable[int]]) -> dict[int, list[int]]:
    E = model.cfg.n_routed_experts
    moe = moe_layers(model)
    out = {}
    for layer, ids in experts.items():
        layer = int(layer)
        if not 0 <= layer < len(model.layers):
            raise ValueError(f"ablate_experts: layer {layer} is not a block of this model (0..{len(model.layers) - 1})")
        if layer not in moe:
            raise ValueError(f"ablate_experts: layer {layer} is a dense block (MoE blocks: {moe})")
        ids = sorted({int(e) for e in ids})
        bad = [e for e in ids if not 0 <= e < E]
        if bad:
            raise ValueError(f"ablate_experts: layer {layer}: expert ids {bad} outside [0, {E})")
        out[layer] = ids
    return out


def reroute_feasible(cfg, allowed: torch.Tensor) -> bool:
    """Whether every token keeps at least top_k selectable experts in whatever groups it keeps.
    Emptied groups are never kept (their score is -inf) unless fewer than topk_group groups
    remain, so the worst case is the topk_group non-empty groups with the fewest survivors."""
    E, G, k = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    if G > 1 and cfg.topk_group < G:
        per_group = sorted(int(c) for c in allowed.view(G, E // G).sum(-1) if int(c) > 0)
        return len(per_group) >= cfg.topk_group and sum(per_group[:cfg.topk_group]) >= k
    return int(allowed.sum()) >= k


@contextlib.contextmanager
def ablate_experts(model, experts: Mapping[int, Iterable[int]], mode: str = "reroute"):
    """Within the block the given experts of the given layers are ablated (module docstring)."""
    if mode not in ("reroute", "zero"):
        raise ValueError(f"mode must be 'reroute' or 'zero', got {mode!r}")
    experts = _check(model, experts)
    E = model.cfg.n_routed_experts
    if mode == "reroute":
        saved = []
        try:
            for layer, ids in experts.items():
                gate = model.layers[layer].mlp.gate
                prev = gate.expert_mask
                allowed = torch.ones(E, dtype=torch.bool) if prev is None else prev.detach().cpu().clone()
                allowed[ids] = False
                if not reroute_feasible(model.cfg, allowed):
                    raise ValueError(f"ablate_experts: layer {layer}: removing {ids} can leave a token fewer "
                                     f"than top_k={model.cfg.num_experts_per_tok} experts in its "
                                     f"{model.cfg.topk_group} kept groups")
                saved.append((gate, prev))
                gate.expert_mask = allowed.to(gate.weight.device)
            yield model
        finally:
            for gate, prev in reversed(saved):
                gate.expert_mask = prev
        return
    ablated = {l: torch.tensor(ids, dtype=torch.int64) for l, ids in experts.items()}
    chosen: dict[int, torch.Tensor] = {}

    def keep_ids(t, name):
        chosen[int(name.split(".")[1])] = t
        return None

    def drop(t, name):
        layer = int(name.split(".")[1])
        hit = torch.isin(chosen[layer], ablated[layer].to(t.device))            # [T,k]
        return t.masked_fill(hit[..., None], 0)

    with hooks(model, [([f"layers.{l}.mlp.gate.hook_topk_ids" for l in experts], keep_ids),
                       ([f"layers.{l}.mlp.hook_expert_out" for l in experts], drop)]):
        yield model


@contextlib.contextmanager
def _one_expert_per_row(model, layer: int, row_expert: torch.Tensor, mode: str):
    """Ablate expert ``row_expert[t]`` for token t of the calls in the block (each batch copy of
    the windows loses a different expert): a [T,E] gate mask, or zeroed slots."""
    gate = model.layers[layer].mlp.gate
    E = model.cfg.n_routed_experts
    if mode == "reroute":
        allowed = torch.ones(row_expert.numel(), E, dtype=torch.bool, device=gate.weight.device)
        allowed[torch.arange(row_expert.numel()), row_expert.to(allowed.device)] = False
        prev, gate.expert_mask = gate.expert_mask, allowed
        try:
            yield
        finally:
            gate.expert_mask = prev
        return
    chosen = {}

    def keep_ids(t, name):
        chosen["ids"] = t
        return None

    def drop(t, name):
        hit = chosen["ids"] == row_expert.to(t.device)[:, None]                     # [T,k]
        return t.masked_fill(hit[..., None], 0)

    with hooks(model, [(f"layers.{layer}.mlp.gate.hook_topk_ids", keep_ids),
                       (f"layers.{layer}.mlp.hook_expert_out", drop)]):
        yield


@torch.no_grad()
def expert_importance(model, windows: torch.Tensor, mode: str = "reroute", layers=None,
                      experts_per_batch: int = 8, progress: bool = True) -> dict:
    """Loss change when each expert alone is ablated, over windows [N, S] (next-token CE, nats).

    Returns ``delta`` [moe_layers, E] (ablated loss - base loss), ``base`` (float), ``load``
    [moe_layers, E] (share of the windows' routed slots each expert took, unablated), ``layers``
    (block indices) and ``rows`` (one dict per (layer, expert), largest delta first).

    Cost: the forward resumes at the ablated block from the cached residual, and
    ``experts_per_batch`` ablations run as batch copies of the windows in one call (copy i loses
    expert i, through a per-token gate mask or per-token zeroing): exact, since batch rows never
    interact, and ~E/experts_per_batch resumed forwards per layer."""
    from dsv3lab.interp.resume import run_from
    if mode not in ("reroute", "zero"):
        raise ValueError(f"mode must be 'reroute' or 'zero', got {mode!r}")
    layers = moe_layers(model) if layers is None else [int(l) for l in layers]
    _check(model, {l: [] for l in layers})
    cfg = model.cfg
    E = cfg.n_routed_experts
    if mode == "reroute":
        one_gone = torch.ones(E, dtype=torch.bool)
        one_gone[0] = False
        if not reroute_feasible(cfg, one_gone):
            raise ValueError("expert_importance: removing one expert can leave a token fewer than top_k choices")
    x = windows[:, :-1].to(model.device)
    y = windows[:, 1:].to(model.device)
    N, S = x.shape
    names = [f"layers.{l}.hook_resid_pre" for l in layers] + [f"layers.{l}.mlp.gate.hook_topk_ids" for l in layers]
    base_logits, cache = run_with_cache(model, x, names)
    base = float(F.cross_entropy(base_logits.float().flatten(0, 1), y.flatten()))
    load = torch.stack([torch.bincount(cache[f"layers.{l}.mlp.gate.hook_topk_ids"].flatten().cpu(), minlength=E).float()
                        for l in layers])
    load = load / load.sum(-1, keepdim=True)
    delta = torch.zeros(len(layers), E)
    todo = [(li, l, lo) for li, l in enumerate(layers) for lo in range(0, E, experts_per_batch)]
    it = todo
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(todo, desc=f"expert importance ({mode})", leave=False)
    for li, l, lo in it:
        chunk = torch.arange(lo, min(E, lo + experts_per_batch))
        c = chunk.numel()
        resid = cache[f"layers.{l}.hook_resid_pre"].repeat(c, 1, 1)                 # copy i = rows i*N..
        with _one_expert_per_row(model, l, chunk.repeat_interleave(N * S), mode):
            logits = run_from(model, l, resid)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.repeat(c, 1).flatten(), reduction="none")
        delta[li, chunk] = ce.view(c, -1).mean(-1).cpu() - base
    rows = [dict(layer=l, expert=e, delta_loss=float(delta[li, e]), load_share=float(load[li, e]))
            for li, l in enumerate(layers) for e in range(E)]
    rows.sort(key=lambda r: -r["delta_loss"])
    return dict(delta=delta, base=base, load=load, layers=layers, rows=rows, mode=mode)
