"""The routing of the latest forward pass, per gate: what training and the parallel runs need.

    with RoutingRecorder(model, scores=True) as rec:
        logits = model(tokens)
    rec.topk_ids[i]      # [T,k] int64, gate i of ``moe_gates(model)`` (None if it did not run)
    rec.scores[i]        # [T,E] the gate's scores s, still in the autograd graph (scores=True)
    rec.counts()         # [E] int64 tokens per expert, one per gate that ran
    rec.named_topk_ids() # {"layers.1.mlp.gate.hook_topk_ids": [T,k], ...} for the gates that ran

Each forward overwrites the previous one's tensors (``reset()`` clears them), so memory does not
grow over a training run. The ids are detached copies; the scores are the gate's own tensor, not
detached, so a balance loss computed from them (``dsv3lab.probes.metrics``) back-propagates into
the gate weights. Hooks are removed when the ``with`` block ends, exceptions included.

``dsv3lab.trace`` is the other recorder: every token of every pass, with positions, sequences and
MTP streams, kept on the CPU and saved to files; this one keeps only the latest pass, on the
model's device, for code that consumes it at once.
"""

from __future__ import annotations

from typing import Optional

import torch

from dsv3lab.probes.gate import named_moe_gates


class RoutingRecorder:
    """Forward hooks on every routed gate's ``hook_topk_ids`` (and ``hook_scores`` on request)."""

    def __init__(self, model, scores: bool = False):
        named = named_moe_gates(model)
        self.names = [n for n, _ in named]
        self.gates = [g for _, g in named]
        self.want_scores = scores
        self.topk_ids: list[Optional[torch.Tensor]] = [None] * len(self.gates)
        self.scores: list[Optional[torch.Tensor]] = [None] * len(self.gates)
        self._handles = []

    def _keep_ids(self, i):
        def hook(module, args, out):
            self.topk_ids[i] = out.detach().clone()
        return hook

    def _keep_scores(self, i):
        def hook(module, args, out):
            self.scores[i] = out
        return hook

    def __enter__(self) -> "RoutingRecorder":
        for i, g in enumerate(self.gates):
            self._handles.append(g.hook_topk_ids.register_forward_hook(self._keep_ids(i)))
            if self.want_scores:
                self._handles.append(g.hook_scores.register_forward_hook(self._keep_scores(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def reset(self) -> None:
        self.topk_ids = [None] * len(self.gates)
        self.scores = [None] * len(self.gates)

    def counts(self) -> list[torch.Tensor]:
        """Tokens routed to each expert, per gate: [E] int64 (gates that did not run are skipped)."""
        return [torch.bincount(ids.reshape(-1), minlength=g.cfg.n_routed_experts)
                for g, ids in zip(self.gates, self.topk_ids) if ids is not None]

    def named_topk_ids(self) -> dict[str, torch.Tensor]:
        """{hook point name: [T,k] ids} for the gates that ran, in model order."""
        return {f"{n}.hook_topk_ids": ids for n, ids in zip(self.names, self.topk_ids) if ids is not None}
