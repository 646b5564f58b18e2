"""Physical expert placement: which replica of which expert each EP rank holds, and which replica
each routed (token, expert) pair goes to.

EPLB (``dsv3lab.balance.eplb.rebalance_experts``) answers placement with a
``physical_to_logical_map`` [L, P]: P >= E physical slots per MoE layer, slot s holding logical
expert ``phy2log[s]``, EP rank j owning slots ``[j*P/ep, (j+1)*P/ep)`` (the map's own
convention, so ``num_gpus = ep``). Without a placement every layer is the contiguous map
``arange(E)`` (P = E: rank j owns experts ``[j*E/ep, (j+1)*E/ep)``, the plain EP layout).

What a rank holds. The distinct logical experts among its slots, one module each
(``moe.experts[e]``, None for the others). Two slots of one expert on one rank (EPLB does that
when an expert is hot enough) share that module: a replica is a copy of the same checkpoint
tensors, so a rank reads each expert it hosts once and runs each slot as its own expert call.

Which replica a pair goes to (``ReplicaMap.choose``). The sender numbers the pairs it routes to
expert e in token order (pair p = t*k + j of its chunk of T tokens), n = 0, 1, 2, ..., and sends
pair n to replica ``(n + sender_ep_rank) % copies(e)`` of e (replicas in slot order). Each sender
thus spreads a hot expert's pairs round-robin over its replicas (within one pair of even), and
the sender's rank as offset spreads senders with one token each (decode) over different
replicas. Deterministic: the same tokens under the same placement give the same slots, so runs
are reproducible and the counts a rank measures can be recomputed from a routing trace.
Outputs do not depend on the choice at all: every replica computes the same function.

This module is pure bookkeeping (no torch.distributed); the dispatcher (``dispatch.py``) and
``apply_layout`` use it, ``rebalance.py`` produces new placements from observed load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from dsv3lab.parallel.layout import LayoutError


@dataclass
class ExpertPlacement:
    """Physical slots per MoE layer: ``phy2log[layer]`` is an int64 [P] tensor (block index ->
    physical_to_logical row). Layers not listed keep the contiguous map ``arange(E)``."""
    phy2log: dict = field(default_factory=dict)

    @classmethod
    def from_eplb(cls, physical_to_logical, layers: Iterable[int]) -> "ExpertPlacement":
        """EPLB's [L, P] map for the MoE layers ``layers`` (block indices, the order of
        ``t.routing.layers`` / ``expert_load()`` rows)."""
        m = torch.as_tensor(physical_to_logical).to(torch.int64)
        layers = list(layers)
        if m.dim() != 2 or m.shape[0] != len(layers):
            raise LayoutError(f"ExpertPlacement: physical_to_logical_map has shape {tuple(m.shape)}, "
                              f"expected [{len(layers)} layers, P slots]")
        return cls({int(l): m[i].clone() for i, l in enumerate(layers)})

    @classmethod
    def contiguous(cls) -> "ExpertPlacement":
        return cls({})

    def row(self, layer: int, n_experts: int) -> torch.Tensor:
        r = self.phy2log.get(int(layer))
        return torch.arange(n_experts) if r is None else r

    def validate(self, cfg, ep: int, moe_layers: Iterable[int]) -> "ExpertPlacement":
        """Every listed layer is an MoE layer of ``cfg``; every slot holds a valid expert; every
        expert has at least one slot; the slots split evenly over the ``ep`` ranks."""
        E = cfg.n_routed_experts
        moe_layers = set(int(l) for l in moe_layers)
        for layer, row in sorted(self.phy2log.items()):
            what = f"ExpertPlacement: MoE layer {layer}"
            if layer not in moe_layers:
                raise LayoutError(f"{what} is not an MoE layer of {cfg.name} (MoE layers {sorted(moe_layers)})")
            if row.dim() != 1:
                raise LayoutError(f"{what}: physical_to_logical row must be 1-D, got shape {tuple(row.shape)}")
            P = row.numel()
            if P < E or P % ep:
                raise LayoutError(f"{what}: {P} physical slots must be >= n_routed_experts={E} and a multiple "
                                  f"of ep={ep}")
            if int(row.min()) < 0 or int(row.max()) >= E:
                raise LayoutError(f"{what}: slot holds expert {int(row.min()) if int(row.min()) < 0 else int(row.max())}"
                                  f", outside [0, {E})")
            missing = sorted(set(range(E)) - set(row.tolist()))
            if missing:
                raise LayoutError(f"{what}: expert(s) {missing[:8]} have no physical slot")
        return self

    def redundant(self, n_experts: int) -> int:
        """Most extra slots in any layer (P - E)."""
        return max((r.numel() - n_experts for r in self.phy2log.values()), default=0)


class ReplicaMap:
    """One MoE layer's placement over one EP group: slots, owners, replicas, and the choice."""

    def __init__(self, phy2log: torch.Tensor, n_experts: int, ep: int):
        self.phy2log = torch.as_tensor(phy2log).to(torch.int64).cpu()
        self.E, self.ep = int(n_experts), int(ep)
        self.P = self.phy2log.numel()
        self.per_rank = self.P // self.ep
        self.count = torch.bincount(self.phy2log, minlength=self.E)                 # [E] copies
        X = int(self.count.max())
        # replicas of each expert in slot order, -1 padded: [E, X]
        order = self.phy2log.argsort(stable=True)
        starts = self.count.cumsum(0) - self.count
        idx = torch.arange(self.P) - starts[self.phy2log[order]]
        self.log2phy = torch.full((self.E, X), -1, dtype=torch.int64)
        self.log2phy[self.phy2log[order], idx] = order
        self.replicated = X > 1
        self._dev = {}

    def slots_of(self, ep_rank: int) -> range:
        return range(ep_rank * self.per_rank, (ep_rank + 1) * self.per_rank)

    def experts_on(self, ep_rank: int) -> list[int]:
        """Logical experts rank ``ep_rank`` holds a module for (its slots' experts, each once)."""
        return sorted(set(self.phy2log[self.slots_of(ep_rank).start:self.slots_of(ep_rank).stop].tolist()))

    def slot_experts(self, ep_rank: int) -> list[int]:
        s = self.slots_of(ep_rank)
        return self.phy2log[s.start:s.stop].tolist()

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._dev:
            self._dev[key] = (self.log2phy.to(device), self.count.to(device))
        return self._dev[key]

    def choose(self, flat_ids: torch.Tensor, sender: int) -> torch.Tensor:
        """Physical slot of each pair: ``flat_ids`` [N] logical experts of the sender's pairs in
        (token, k) order -> [N] slots (module docstring: round-robin over e's replicas starting
        at ``sender``)."""
        log2phy, count = self._on(flat_ids.device)
        if not self.replicated:
            return log2phy[flat_ids, 0]
        N = flat_ids.numel()
        order = flat_ids.argsort(stable=True)
        per_e = torch.bincount(flat_ids, minlength=self.E)
        starts = per_e.cumsum(0) - per_e
        nth = torch.empty_like(flat_ids)
        nth[order] = torch.arange(N, device=flat_ids.device) - starts[flat_ids[order]]
        copy = (nth + sender) % count[flat_ids]
        return log2phy[flat_ids, copy]


def moe_layers(model) -> list[int]:
    """Block indices of the MoE layers (main stack, then MTP)."""
    from dsv3lab.model.moe import MoE
    return [blk.layer for blk in list(model.layers) + list(model.mtp) if isinstance(blk.mlp, MoE)]


def check_placement(placement: Optional[ExpertPlacement], cfg, ep: int, layers: Iterable[int]) -> ExpertPlacement:
    placement = placement if placement is not None else ExpertPlacement.contiguous()
    if not isinstance(placement, ExpertPlacement):
        raise LayoutError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
    return placement.validate(cfg, ep, layers)


__all__ = ["ExpertPlacement", "ReplicaMap", "check_placement", "moe_layers"]
