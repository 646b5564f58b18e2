"""Resume a forward at block L from a cached residual: the blocks after an intervention are the
only ones that need running again (expert importance runs ablations layer by layer this way)."""

from __future__ import annotations

import torch


def run_from(model, layer: int, resid_pre: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Logits [B,S,V] of blocks ``layer..`` + final norm + head applied to ``resid_pre`` [B,S,D]
    (the residual into block ``layer``, ``layers.{layer}.hook_resid_pre``). No cache: a full
    prefill of positions [start, start+S). Hook points fire as in a forward."""
    S = resid_pre.shape[1]
    cos, sin = model.rope.get(start, start + S, model.device)
    x = resid_pre
    for blk in model.layers[layer:]:
        x = blk(x, cos, sin, start, None)
    return model.hook_logits(model.head(model.hook_final(x)))
