"""Expert-load metrics and balance losses: the one home of each (training, probes, EPLB and the
replication rows import them from here).

Everything takes plain tensors (``topk_ids`` [L,N,k] or [N,k], loads [..., E]) so it applies to
traces from dsv3lab, SGLang or Megatron alike; ``Routing`` objects are accepted where a function
needs the token metadata (steps, sequences).

  expert_load      [L,E]   tokens sent to each expert (sums to N*k per layer)
  max_vio          [...]   (max_i load_i - mean load) / mean load (the loss-free balancing paper,
                           Wang et al. 2024, arXiv 2408.15664)
  max_vio_per_batch [B,L]  MaxVio of each forward pass; MaxVio_batch in the paper is its mean
  max_vio_global   [L]     MaxVio of the load summed over the whole trace
  sequence_imbalance [S,L] MaxVio of each sequence's own load (what the sequence-wise loss targets)
  sequence_balance_loss    alpha * sum_i f_i P_i per sequence, averaged (DeepSeek-V3 report,
                           sec. 2.1.2, eqs. 17-20); differentiable in the scores
  batch_balance_loss       the same with the whole batch as one sequence (report, sec. 4.5.3)
  routing_balance_loss [L] the sequence-wise loss of a trace recorded with scores=True
  load_entropy     [L]     entropy of the load distribution / ln E (1 = perfectly even)
  routing_entropy  [L]     mean entropy of each token's normalised top-k weights / ln k
  co_selection     [E,E]   tokens that chose both i and j (diagonal = load)
  groups_touched   [L,N]   distinct expert groups per token (<= topk_group by construction)
  nodes_touched    [L,N]   distinct nodes per token for an expert->node map (the all-to-all
                           fan-out that node-limited routing bounds to M = 4 in V3)
  load_per_rank    [L,R]   tokens each rank computes for an expert->rank placement, or for an
                           EPLB physical->logical map (replicas share their expert's load)
  balancedness     [L]     mean/max load per rank (SGLang's and vLLM's figure of merit)

The balance loss, for one sequence of T tokens, N_r routed experts and K_r chosen per token:
  f_i = N_r / (K_r T) * #{t : i in TopK_t}          (no gradient: a count)
  P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}         (differentiable in the gate's scores s)
  L_Bal = alpha * sum_i f_i P_i
f_i averages to 1 over experts, so L_Bal = alpha exactly when the load and the mean normalised
score are both uniform.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def _ids(x) -> torch.Tensor:
    return x.topk_ids if hasattr(x, "topk_ids") else x


def expert_load(topk_ids, n_experts: int) -> torch.Tensor:
    """[..., N, k] ids -> [..., E] int64 counts."""
    ids = _ids(topk_ids).to(torch.int64)
    lead = ids.shape[:-2]
    flat = ids.reshape(-1, ids.shape[-2] * ids.shape[-1])
    valid = flat >= 0
    offs = torch.arange(flat.shape[0])[:, None] * n_experts
    out = torch.bincount((flat + offs)[valid], minlength=flat.shape[0] * n_experts)
    return out.view(*lead, n_experts)


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio over the last (expert) axis: (max - mean) / mean. 0 = perfectly balanced."""
    load = load.double()
    mean = load.mean(dim=-1)
    return ((load.amax(dim=-1) - mean) / mean.clamp_min(1e-12)).float()


def _group_ids(routing, by: str) -> torch.Tensor:
    if by == "step":
        return routing.step
    if by == "sequence":
        return sequence_ids(routing)
    raise ValueError(f"by must be 'step' or 'sequence', got {by!r}")


def _grouped_load(routing, by: str) -> torch.Tensor:
    """[n_groups, L, E] load of each step or sequence, groups in order of first appearance."""
    gid = _group_ids(routing, by)
    _, inv = torch.unique_consecutive(gid, return_inverse=True) if _is_sorted_runs(gid) else torch.unique(gid, return_inverse=True)
    n = int(inv.max()) + 1 if inv.numel() else 0
    ids = routing.topk_ids                                            # [L,N,k]
    L, N, k = ids.shape
    E = routing.n_routed_experts
    key = (inv[None, :, None] * E + ids).reshape(L, -1)               # [L, N*k]
    out = torch.stack([torch.bincount(key[l], minlength=n * E) for l in range(L)]) if L else torch.zeros(0, n * E)
    return out.view(L, n, E).transpose(0, 1)


def _is_sorted_runs(x: torch.Tensor) -> bool:
    """True when equal values are contiguous (then runs keep their order of appearance)."""
    if x.numel() < 2:
        return True
    _, counts = torch.unique_consecutive(x, return_counts=True)
    return counts.numel() == torch.unique(x).numel()


def max_vio_per_batch(routing) -> torch.Tensor:
    """[steps, L] MaxVio of each forward pass (one batch)."""
    return max_vio(_grouped_load(routing, "step"))


def max_vio_global(routing_or_load, n_experts: Optional[int] = None) -> torch.Tensor:
    """[L] MaxVio of the whole trace's load."""
    if isinstance(routing_or_load, torch.Tensor) and routing_or_load.dim() == 2 and n_experts is None:
        return max_vio(routing_or_load)
    if hasattr(routing_or_load, "expert_load"):
        return max_vio(routing_or_load.expert_load())
    return max_vio(expert_load(routing_or_load, n_experts))


def sequence_ids(routing) -> torch.Tensor:
    """[N] one id per request: a step that starts at position 0 opens a new sequence for each
    batch row; later steps (decode) continue the sequence of the same row."""
    step, seq, pos = routing.step, routing.seq, routing.positions
    out = torch.empty_like(step)
    current: dict[int, int] = {}
    next_id = 0
    # iterate over (step, row) runs, cheap: one entry per run
    key = step * (int(seq.max()) + 1 if seq.numel() else 1) + seq
    vals, counts = torch.unique_consecutive(key, return_counts=True)
    i = 0
    for c in counts.tolist():
        row, p0 = int(seq[i]), int(pos[i])
        if p0 <= 0 or row not in current:
            current[row] = next_id
            next_id += 1
        out[i:i + c] = current[row]
        i += c
    return out


def sequence_imbalance(routing) -> torch.Tensor:
    """[sequences, L] MaxVio of each sequence's own expert load."""
    return max_vio(_grouped_load(routing, "sequence"))


def sequence_balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, batch: int, top_k: int,
                          alpha: float = 1e-4) -> torch.Tensor:
    """Sequence-wise balance loss alpha * sum_i f_i P_i, averaged over the ``batch`` sequences.

    scores [..., B*T, E]: the gate's scores s (sigmoid or softmax, before the bias), rows
    batch-major (sequence b holds rows b*T .. b*T+T-1); topk_ids [..., B*T, k] the chosen experts;
    leading dims (e.g. layers) are kept: the result is [...] (a scalar for 2-D input). Gradients
    flow into ``scores`` through P; f is a count. ``alpha`` is the report's 1e-4 by default."""
    E = scores.shape[-1]
    lead = scores.shape[:-2]
    if topk_ids.shape[:-1] != scores.shape[:-1]:
        raise ValueError(f"scores {tuple(scores.shape)} and topk_ids {tuple(topk_ids.shape)} must agree "
                         "on every dim but the last")
    if scores.shape[-2] % batch:
        raise ValueError(f"{scores.shape[-2]} token rows do not split into {batch} equal sequences")
    T = scores.shape[-2] // batch
    chosen = torch.zeros(scores.shape, dtype=scores.dtype, device=scores.device)
    chosen.scatter_(-1, topk_ids.to(torch.int64), 1.0)
    f = chosen.reshape(*lead, batch, T, E).sum(-2) * (E / (top_k * T))           # [..., B, E]
    s = scores.reshape(*lead, batch, T, E)
    P = (s / s.sum(-1, keepdim=True)).mean(-2)                                    # [..., B, E]
    return alpha * (f * P).sum(-1).mean(-1)


def batch_balance_loss(scores: torch.Tensor, topk_ids: torch.Tensor, top_k: int,
                       alpha: float = 1e-4) -> torch.Tensor:
    """Batch-wise balance loss: f and P over every token of the batch at once, so only the
    batch's load must be even, not each sequence's (the variant of the report's sec. 4.5.3).
    scores [..., N, E], topk_ids [..., N, k] -> [...]; differentiable in ``scores``."""
    return sequence_balance_loss(scores, topk_ids, 1, top_k, alpha)


def routing_balance_loss(routing, alpha: float = 1e-4) -> torch.Tensor:
    """[L] sequence-wise balance loss of a trace (``dsv3lab.trace(model, scores=True)``): each
    traced request (``sequence_ids``: prefill plus its decode steps) is one sequence, of its own
    length; computed in float64, returned as float32."""
    if routing.scores is None:
        raise ValueError("trace with scores=True to compute the balance loss")
    if routing.n_tokens == 0:
        raise ValueError("the trace holds no tokens: no balance loss to compute")
    _, inv = torch.unique(sequence_ids(routing), return_inverse=True)
    s, ids = routing.scores.double(), routing.topk_ids
    per_seq = [sequence_balance_loss(s[:, idx], ids[:, idx], 1, routing.top_k, alpha)
               for idx in (torch.nonzero(inv == j).flatten() for j in range(int(inv.max()) + 1))]
    return torch.stack(per_seq).mean(0).float()


def load_entropy(load: torch.Tensor) -> torch.Tensor:
    """Entropy of the normalised load over experts / ln E: 1 = even, 0 = one expert takes all."""
    p = load.double() / load.double().sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return (h / math.log(load.shape[-1])).float()


def routing_entropy(topk_weights: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy of each token's normalised top-k weights / ln k ([L])."""
    w = topk_weights.double()
    p = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    h = -(p * p.clamp_min(1e-300).log()).sum(-1)
    return (h.mean(-1) / math.log(max(w.shape[-1], 2))).float()


def co_selection(topk_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[N,k] (one layer) -> [E,E] int64: C[i,j] = tokens that chose both i and j; C[i,i] = load."""
    ids = _ids(topk_ids)
    if ids.dim() != 2:
        raise ValueError(f"co_selection takes one layer's [N,k] ids, got shape {tuple(ids.shape)}")
    onehot = torch.zeros(ids.shape[0], n_experts, dtype=torch.float64)
    onehot.scatter_(1, ids, 1.0)
    return (onehot.T @ onehot).round().to(torch.int64)


def contiguous_map(n_experts: int, n_parts: int) -> torch.Tensor:
    """[E] part of each expert when ``n_parts`` parts hold contiguous equal blocks (groups, nodes,
    the official demo's expert-parallel ranks)."""
    if n_experts % n_parts:
        raise ValueError(f"{n_experts} experts do not split into {n_parts} equal parts")
    return torch.arange(n_experts) // (n_experts // n_parts)


def _distinct(parts: torch.Tensor) -> torch.Tensor:
    s, _ = parts.sort(dim=-1)
    return 1 + (s[..., 1:] != s[..., :-1]).sum(-1)


def groups_touched(topk_ids, n_group: int, n_experts: int) -> torch.Tensor:
    """[..., N] distinct expert groups each token routed to."""
    ids = _ids(topk_ids)
    return _distinct(contiguous_map(n_experts, n_group)[ids])


def nodes_touched(topk_ids, expert_to_node: torch.Tensor) -> torch.Tensor:
    """[..., N] distinct nodes each token's experts live on. ``expert_to_node`` is [E], or
    [L,E] per layer (when ``topk_ids`` is [L,N,k])."""
    ids = _ids(topk_ids)
    m = torch.as_tensor(expert_to_node)
    if m.dim() == 1:
        return _distinct(m[ids])
    return _distinct(torch.stack([m[l][ids[l]] for l in range(ids.shape[0])]))


def load_per_rank(load: torch.Tensor, expert_to_rank: torch.Tensor, n_ranks: Optional[int] = None) -> torch.Tensor:
    """[L,E] load -> [L,R] tokens each rank computes; ``expert_to_rank`` [E] or [L,E]."""
    load = load if load.dim() == 2 else load[None]
    m = torch.as_tensor(expert_to_rank).to(torch.int64)
    m = m.expand(load.shape[0], -1) if m.dim() == 1 else m
    R = n_ranks or int(m.max()) + 1
    out = torch.zeros(load.shape[0], R, dtype=load.dtype)
    return out.scatter_add_(1, m, load)


def load_per_rank_replicated(load, phy_to_log, n_ranks: int) -> torch.Tensor:
    """[L,E] (or [E]) load and an EPLB ``physical_to_logical_map`` [L,P] (or [P]: P physical
    slots, P/n_ranks per rank, in rank order) -> [L,R] (or [R]) float64 load per rank, each
    expert's tokens split evenly over its replicas. ``dsv3lab.balance.gpu_loads`` is this."""
    w = torch.as_tensor(load).to(torch.float64)
    m = torch.as_tensor(phy_to_log).to(torch.int64)
    squeeze = w.dim() == 1
    w = w[None] if squeeze else w
    m = m.expand(w.shape[0], -1) if m.dim() == 1 else m
    L, P = m.shape
    if P % n_ranks:
        raise ValueError(f"{P} slots do not split evenly over {n_ranks} GPUs")
    copies = torch.zeros_like(w).scatter_add_(1, m, torch.ones(L, P, dtype=torch.float64))
    out = (w.gather(1, m) / copies.gather(1, m)).view(L, n_ranks, P // n_ranks).sum(-1)
    return out[0] if squeeze else out


def balancedness(per_rank) -> torch.Tensor:
    """mean / max tokens per rank (or GPU) over the last axis, float64: 1 = perfectly even
    (SGLang's and vLLM's EPLB figure of merit)."""
    per_rank = torch.as_tensor(per_rank).double()
    return per_rank.mean(-1) / per_rank.amax(-1).clamp_min(1e-12)


def summary(routing, expert_to_node: Optional[torch.Tensor] = None) -> list[dict]:
    """One row per traced layer: tokens, MaxVio (global and mean per batch), entropies, groups and
    nodes touched per token."""
    load = routing.expert_load()
    E, meta = routing.n_routed_experts, routing.record["meta"]
    mv_batch = max_vio_per_batch(routing).mean(0) if routing.n_tokens else torch.zeros(len(routing.layers))
    rows = []
    groups = groups_touched(routing.topk_ids, meta["n_group"], E).double().mean(-1)
    nodes = nodes_touched(routing.topk_ids, expert_to_node).double().mean(-1) if expert_to_node is not None else None
    ent = routing_entropy(routing.topk_weights)
    for i, layer in enumerate(routing.layers):
        row = dict(layer=layer, tokens=routing.n_tokens, max_vio_global=float(max_vio(load[i])),
                   max_vio_batch=float(mv_batch[i]), load_entropy=float(load_entropy(load[i])),
                   routing_entropy=float(ent[i]), groups_per_token=float(groups[i]))
        if nodes is not None:
            row["nodes_per_token"] = float(nodes[i])
        rows.append(row)
    return rows
