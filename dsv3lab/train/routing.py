"""Routing as training sees it: the gates of a model, the experts each chose in the latest forward,
and the MaxVio of a step's counts."""

from __future__ import annotations

from typing import Optional

import torch


def moe_gates(model) -> list:
    """Every routed gate of the model, main blocks then MTP blocks (each has its own bias)."""
    from dsv3lab.model.moe import Gate
    return [m for m in model.modules() if isinstance(m, Gate)]


class RoutingRecorder:
    """Forward hooks on each gate: ``topk_ids[i]`` [T,k] and (if ``scores``) the differentiable
    scores [T,E] of gate i from the latest forward. Use as a ``with`` block."""

    def __init__(self, model, scores: bool = False):
        self.gates = moe_gates(model)
        self.want_scores = scores
        self.topk_ids: list[Optional[torch.Tensor]] = [None] * len(self.gates)
        self.scores: list[Optional[torch.Tensor]] = [None] * len(self.gates)
        self._handles = []

    def __enter__(self):
        for i, g in enumerate(self.gates):
            self._handles.append(g.hook_topk_ids.register_forward_hook(
                lambda mod, inp, out, i=i: self.topk_ids.__setitem__(i, out.detach())))
            if self.want_scores:
                self._handles.append(g.hook_scores.register_forward_hook(
                    lambda mod, inp, out, i=i: self.scores.__setitem__(i, out)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self):
        self.topk_ids = [None] * len(self.gates)
        self.scores = [None] * len(self.gates)

    def counts(self) -> list[torch.Tensor]:
        """Tokens routed to each expert, per gate: [E] int64 (gates that did not run are skipped)."""
        return [torch.bincount(ids.reshape(-1), minlength=g.cfg.n_routed_experts)
                for g, ids in zip(self.gates, self.topk_ids) if ids is not None]


def max_violation(counts: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load for one layer's [E] counts."""
    counts = counts.double()
    mean = counts.mean()
    return float((counts.max() - mean) / mean) if mean > 0 else 0.0
