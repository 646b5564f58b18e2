"""How many routing decisions differ between two traces of the same tokens: FP8 against bf16 weights,
a quantized checkpoint against its release, one kernel path against another.

    with dsv3lab.trace(bf16_model) as a: bf16_model(tokens)
    with dsv3lab.trace(fp8_model) as b:  fp8_model(tokens)          # the same tokens, teacher-forced
    d = routing_flips(a.routing, b.routing)
    d["tokens_changed"]      # fraction of (token, layer) whose top-k expert *set* differs
    d["choices_changed"]     # fraction of the k expert slots that moved to another expert
    d["per_layer"]           # the same two numbers per MoE layer, with the layer index

A routed MoE layer is a hard decision on top of soft numbers: where two of a token's expert scores
are nearly tied, any rounding difference upstream -- FP8 weights, activations quantized in 1x128
tiles, another accumulation order -- can swap which expert runs. The FP8 recipe of the V3 report
(sec. 3.3) keeps the router itself in higher precision, so what flips a choice is the hidden state
reaching it. Counting flips answers "does FP8 change which experts run, and where?" on any model the
lab can trace, the released sizes included: trace the two models one after the other (each record
is small: [layers, tokens, k] ids) so both never need to be in memory at once.

The count is over expert *sets* (the order of a token's k choices does not matter to the output,
only which experts run and with what weights); ``weight_change`` is the mean absolute change of the
routing weight of the experts both chose.
"""

from __future__ import annotations

import torch

from dsv3lab.probes.trace import Routing


def _check_same_tokens(a: Routing, b: Routing) -> None:
    if a.topk_ids is None or b.topk_ids is None:
        raise ValueError("routing_flips: a trace has no routing (was anything run inside the trace?)")
    if a.topk_ids.shape != b.topk_ids.shape:
        raise ValueError(f"routing_flips: the traces differ in shape [layers, tokens, top_k]: "
                         f"{tuple(a.topk_ids.shape)} against {tuple(b.topk_ids.shape)}")
    if a.layers != b.layers:
        raise ValueError(f"routing_flips: the traces cover different MoE layers: {a.layers} against {b.layers}")
    for key in ("token_ids", "positions"):
        ta, tb = getattr(a, key), getattr(b, key)
        if ta is not None and tb is not None and not torch.equal(ta, tb):
            n = int((ta != tb).sum())
            raise ValueError(f"routing_flips: the traces are not of the same tokens ({key} differ at {n} "
                             f"places): run both models on the same inputs, teacher-forced")


def routing_flips(a: Routing, b: Routing) -> dict:
    """Routing decisions that differ between ``a`` and ``b`` (two traces of the same tokens)."""
    _check_same_tokens(a, b)
    ids_a, ids_b = a.topk_ids, b.topk_ids                                 # [L, N, k]
    L, N, k = ids_a.shape
    E = a.n_routed_experts
    chosen_a = torch.zeros(L, N, E, dtype=torch.bool).scatter_(2, ids_a, True)
    chosen_b = torch.zeros(L, N, E, dtype=torch.bool).scatter_(2, ids_b, True)
    moved = (chosen_a & ~chosen_b).sum(-1)                                # [L, N] slots now elsewhere
    both = chosen_a & chosen_b
    w_a = torch.zeros(L, N, E).scatter_(2, ids_a, a.topk_weights.float())
    w_b = torch.zeros(L, N, E).scatter_(2, ids_b, b.topk_weights.float())
    dw = ((w_a - w_b).abs() * both).sum() / both.sum().clamp(min=1)
    per_layer = [dict(layer=layer, tokens_changed=float((moved[i] > 0).double().mean()) if N else 0.0,
                      choices_changed=float(moved[i].sum()) / max(N * k, 1))
                 for i, layer in enumerate(a.layers)]
    return dict(tokens=N, layers=L, top_k=k,
                tokens_changed=float((moved > 0).double().mean()) if N else 0.0,
                choices_changed=float(moved.sum()) / max(L * N * k, 1),
                weight_change=float(dw), per_layer=per_layer)


__all__ = ["routing_flips"]
