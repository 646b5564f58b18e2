"""Expert placement with redundant experts, the way DeepSeek's EPLB does it (EPLB README and
``eplb.py``; docs/references.md#eplb).

The problem. Serving V3 spreads 256 routed experts per layer over many GPUs. A GPU's work is the
tokens its experts receive, and expert load is skewed (a few "hot" experts get several times the
mean). A GPU waits for the slowest one in every all-to-all, so the figure of merit is
``balancedness = mean / max`` load per GPU. EPLB buys balance with memory: it places
``num_replicas >= num_logical`` *physical* expert slots, the hottest experts get extra copies
(redundant experts; V3's prefill unit has 32 of them, report sec. 3.4.1), and each copy takes an equal
share of its expert's tokens.

Three greedy steps, each a building block exported here:

  replicate_experts   give the next spare slot to the expert whose per-copy load
                      ``weight / count`` is largest, until the slots run out.
  balanced_packing    put items (groups, replicas) into packs (nodes, GPUs) that each take exactly
                      n / num_packs items: heaviest item first, into the lightest pack not yet full.
  rebalance_experts   compose them.

Hierarchical mode (``num_groups % num_nodes == 0``). V3 routes each token to at most
``topk_group`` groups of contiguous experts so that it touches few nodes (report sec. 2.1.2). Placement
keeps that promise by moving whole groups: (1) pack the groups onto nodes by group load;
(2) inside each node, replicate that node's experts into its ``num_replicas / num_nodes`` slots;
(3) pack the node's replicas onto its GPUs. Replicas never leave their node, so a token's
traffic stays on the nodes of its groups.

Global mode (anything else) is the same recipe with one group and one node: every expert is
replicated against all the others and replicas go to any GPU. Better balance, no node locality;
the README recommends it for decode's large expert parallelism.

Outputs, per layer (``L`` layers, ``E`` logical experts, ``P = num_replicas`` slots, GPU ``g``
owns slots ``g*P/G .. (g+1)*P/G - 1``):

  physical_to_logical_map [L, P]       the logical expert held by each slot
  logical_to_physical_map [L, E, X]    the slots holding each expert, -1 padded,
                                       X = P - E + 1 (the most copies one expert can get)
  expert_count            [L, E]       copies of each expert (>= 1, sums to P)

The greedy choices break ties towards the lower index, which makes the output deterministic and
reproduces the README example exactly (tests/test_balance.py). Load *prediction* (what weight to
feed in) is out of scope; the README suggests a moving average of recent loads.
"""

from __future__ import annotations

import torch

# One definition each, in the metrics module; exported here under EPLB's names.
from dsv3lab.probes.metrics import balancedness  # noqa: F401
from dsv3lab.probes.metrics import load_per_rank_replicated as gpu_loads  # noqa: F401

__all__ = ["balanced_packing", "replicate_experts", "rebalance_experts", "contiguous_placement",
           "gpu_loads", "balancedness"]


def _rows(weight) -> torch.Tensor:
    w = torch.as_tensor(weight)
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [layers, items], got shape {tuple(w.shape)}")
    return w.detach().to("cpu", torch.float64)


def balanced_packing(weight, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``n`` items of each row of ``weight`` [X, n] into ``num_packs`` packs of exactly
    ``n / num_packs`` items with loads as even as greedy gets them: items in decreasing weight
    (ties: lower index first) each go to the lightest pack that still has room (ties: lower pack).

    Returns ``(pack_index, rank_in_pack)``, both [X, n] int64: the pack of each item and its
    position inside the pack (the order in which the pack received it)."""
    w = _rows(weight)
    X, n = w.shape
    if num_packs < 1 or n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    capacity = n // num_packs
    pack_index = torch.empty(X, n, dtype=torch.int64)
    rank_in_pack = torch.empty(X, n, dtype=torch.int64)
    for x in range(X):
        row = w[x].tolist()
        load = [0.0] * num_packs
        filled = [0] * num_packs
        for item in sorted(range(n), key=lambda i: -row[i]):       # sorted() is stable
            pack = min((p for p in range(num_packs) if filled[p] < capacity), key=load.__getitem__)
            pack_index[x, item] = pack
            rank_in_pack[x, item] = filled[pack]
            filled[pack] += 1
            load[pack] += row[item]
    return pack_index, rank_in_pack


def replicate_experts(weight, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fill ``num_phy`` slots with the ``num_log`` experts of each row of ``weight`` [X, num_log]:
    slot i < num_log holds expert i, every further slot copies the expert whose load per copy
    (``weight / count``) is then the largest (ties: lower index).

    Returns ``(phy2log [X, num_phy], rank [X, num_phy], logcnt [X, num_log])``: the expert in each
    slot, which copy of it the slot is (0 = the original), and copies per expert."""
    w = _rows(weight)
    X, num_log = w.shape
    if num_phy < num_log:
        raise ValueError(f"{num_phy} physical slots cannot hold {num_log} logical experts")
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(X, 1)
    rank = torch.zeros(X, num_phy, dtype=torch.int64)
    logcnt = torch.ones(X, num_log, dtype=torch.int64)
    rows = torch.arange(X)
    for slot in range(num_log, num_phy):
        hottest = (w / logcnt).argmax(dim=-1)                     # first maximum on ties
        phy2log[:, slot] = hottest
        rank[:, slot] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation [X, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.shape[1]).expand_as(perm).contiguous())
    return inv


def _place(w: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """Hierarchical placement of [L, E] loads; global mode is num_groups = num_nodes = 1.
    Returns (phy2log [L,P], copy rank [L,P], count [L,E])."""
    L, E = w.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = E // num_nodes
    slots_per_node = num_replicas // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # 1. whole groups onto nodes. Renumber the experts node-major ("position"): the group that
    #    went to node n as its r-th group takes positions (n*groups_per_node + r)*group_size + j.
    group_load = w.view(L, num_groups, group_size).sum(-1)
    node, r = balanced_packing(group_load, num_nodes)
    group_pos = node * groups_per_node + r                                          # [L, groups]
    log2pos = (group_pos[:, :, None] * group_size + torch.arange(group_size)).reshape(L, E)
    pos2log = _inverse(log2pos)

    # 2. replicate inside each node: one row per (layer, node), that node's experts only
    node_w = w.gather(1, pos2log).view(L * num_nodes, experts_per_node)
    phy2local, copy_rank, local_cnt = replicate_experts(node_w, slots_per_node)

    # 3. the node's replicas onto its GPUs, each replica carrying an equal share of its expert
    replica_w = (node_w / local_cnt).gather(1, phy2local)
    gpu, s = balanced_packing(replica_w, num_gpus // num_nodes)
    slot_of_phy = gpu * slots_per_gpu + s                                           # slot in node
    phy_of_slot = _inverse(slot_of_phy)

    # back to global slot order and logical expert ids
    node_offset = (torch.arange(num_nodes) * experts_per_node).repeat(L)[:, None]  # [L*nodes, 1]
    pos_in_slot = (phy2local.gather(1, phy_of_slot) + node_offset).view(L, num_replicas)
    phy2log = pos2log.gather(1, pos_in_slot)
    rank = copy_rank.gather(1, phy_of_slot).view(L, num_replicas)
    count = local_cnt.view(L, E).gather(1, log2pos)
    return phy2log, rank, count


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place ``weight`` [layers, num_logical] (tokens per expert, e.g. ``t.routing.expert_load()``)
    on ``num_replicas`` slots over ``num_gpus`` GPUs in ``num_nodes`` nodes. Hierarchical when
    ``num_groups % num_nodes == 0`` (groups of contiguous experts stay whole on one node), global
    otherwise. Returns ``(physical_to_logical_map [L, P], logical_to_physical_map [L, E, P-E+1]
    (-1 padded), expert_count [L, E])``, all int64 on the CPU."""
    w = torch.as_tensor(weight)
    if w.dim() != 2:
        raise ValueError(f"weight must be [layers, num_logical_experts], got shape {tuple(w.shape)}")
    if w.is_floating_point() and not torch.isfinite(w).all():
        raise ValueError("weight has NaN or infinite entries")
    if (w < 0).any():
        raise ValueError("weight (expert load) must be non-negative")
    L, E = w.shape
    for name, v in (("num_replicas", num_replicas), ("num_groups", num_groups),
                    ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if num_replicas < E:
        raise ValueError(f"num_replicas ({num_replicas}) must be at least the number of logical "
                         f"experts ({E})")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas ({num_replicas}) must be a multiple of num_gpus ({num_gpus})")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    w = _rows(w)
    if num_groups % num_nodes == 0:
        if E % num_groups:
            raise ValueError(f"{E} experts do not split into {num_groups} equal groups")
        if num_replicas % num_nodes or E % num_nodes:
            raise ValueError("experts and replicas must split evenly over the nodes")
        phy2log, rank, count = _place(w, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, rank, count = _place(w, num_replicas, 1, 1, num_gpus)
    width = num_replicas - E + 1
    log2phy = torch.full((L, E * width), -1, dtype=torch.int64)
    log2phy.scatter_(1, phy2log * width + rank, torch.arange(num_replicas).expand(L, -1).contiguous())
    return phy2log, log2phy.view(L, E, width), count


def contiguous_placement(num_layers: int, num_logical: int) -> torch.Tensor:
    """[L, E] physical_to_logical_map of the plain expert-parallel layout (no redundancy, GPU g
    owns a contiguous block of experts): the "before" of a rebalance."""
    return torch.arange(num_logical).repeat(num_layers, 1)
