"""Rebalancing a running multi-rank model from the load it observed (EPLB's loop, served).

    with dsv3lab.trace(model) as t:                 # a window of traffic, on every rank
        ... forwards / generate ...
    load = window_load(t, model)                    # [moe layers, E], the same on every rank
    new, layers = rebalanced_placement(load, model, redundant=4)      # EPLB rebalance_experts
    moved = apply_placement(model, new)             # every rank, between two forwards
    per_rank = rank_loads(model)                    # [layers, world] pairs each rank computed

``window_load`` gathers the routing trace of every data-parallel group (one copy per TP group)
on rank 0 and broadcasts its expert load, so every rank plans the same placement from the same
numbers. ``rebalanced_placement`` calls ``dsv3lab.balance.eplb.rebalance_experts`` with the EP group's
ranks as GPUs (``num_nodes`` of them, hierarchical when the routing groups split over the nodes)
and returns the placement with the per-rank load EPLB predicts for it
(``load_per_rank_replicated``: every replica takes an equal share of its expert). ``apply_placement``
swaps the placement in place: experts a rank no longer hosts are dropped, experts it now hosts
are read from the checkpoint -- only those (the loader's own shape/check/read steps, restricted to
the moved experts' tensors) -- and the dispatchers use the new replica map from the next call.
``rank_loads`` reads the dispatchers' own counters (pairs each rank's slots computed), the
measured figure to put next to the prediction.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from dsv3lab.parallel.apply import parallel_state
from dsv3lab.parallel.layout import LayoutError
from dsv3lab.parallel.placement import ExpertPlacement, ReplicaMap, check_placement, moe_layers
from dsv3lab.probes.metrics import balancedness, load_per_rank_replicated


def _state(model, what: str):
    st = parallel_state(model)
    if st is None:
        raise LayoutError(f"{what}: the model is not sharded (apply_layout / load_sharded first)")
    return st


def window_load(trace, model) -> torch.Tensor:
    """[main MoE layers, E] tokens routed to each expert over the traced window, summed over the
    data-parallel groups; identical on every rank (collective: every rank calls it)."""
    from dsv3lab.probes.trace import Routing, gather
    st = _state(model, "window_load")
    ctx = st.ctx
    if ctx.virtual or ctx.world_size == 1:
        return trace.routing.expert_load()
    merged = gather(trace.record(), contribute=ctx.tp_rank == 0)
    box = [Routing(merged).expert_load() if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rebalanced_placement(load, model, redundant: int, num_nodes: int = 1, num_groups: int | None = None
                   ) -> tuple[ExpertPlacement, dict]:
    """EPLB placement of ``load`` [main MoE layers, E] on the EP group with ``redundant`` extra
    slots per layer. ``num_groups`` defaults to the config's routing groups (hierarchical
    placement when they split over ``num_nodes``; pass 1 with ``num_nodes`` > 1 for the global
    policy). Returns the placement and the prediction: per-rank load [layers, ep] before (the
    model's current placement) and after, and their balancedness [layers]."""
    from dsv3lab.balance.eplb import rebalance_experts
    st = _state(model, "rebalanced_placement")
    cfg, ep = model.cfg, st.ctx.ep
    E = cfg.n_routed_experts
    layers = [blk.layer for blk in model.layers if blk.layer in st.dispatchers]
    load = torch.as_tensor(load)
    if load.shape != (len(layers), E):
        raise LayoutError(f"rebalanced_placement: load has shape {tuple(load.shape)}, expected [{len(layers)} MoE layers, {E}]")
    phy2log, _, _ = rebalance_experts(load, E + redundant, num_groups or cfg.n_group, num_nodes, ep)
    new = ExpertPlacement.from_eplb(phy2log, layers)
    old = torch.stack([st.placement.row(l, E) for l in layers]) if st.placement.phy2log else \
        torch.arange(E).repeat(len(layers), 1)
    before = load_per_rank_replicated(load, old, ep)
    after = load_per_rank_replicated(load, phy2log, ep)
    return new, dict(layers=layers, predicted_before=before, predicted_after=after,
                     balancedness_before=balancedness(before), balancedness_after=balancedness(after))


def _read_experts(model, path: str, modules: set, fp8: str) -> int:
    """Fill the meta expert modules in ``modules`` from checkpoint ``path`` with the loader's own
    list of reads (``reads_for``: shapes and FP8 scales checked from the headers), reading only
    their tensors."""
    from dsv3lab.checkpoint import ShardReader, hf_key, read_tensors, reads_for
    from dsv3lab.model.transformer import Transformer
    cfg = model.cfg
    reader = ShardReader(path)
    whole = Transformer(cfg, model.dtype, "meta")
    full_shapes = {hf_key(cfg, n): tuple(t.shape) for n, t in list(whole.named_parameters()) + list(whole.named_buffers())
                   if not n.endswith("weight_scale_inv")}
    reads = [r for r in reads_for(path, cfg, reader, model, full_shapes) if r.module in modules]
    read_tensors(reads, reader, cfg, model.device, fp8)
    return reader.bytes_read


def apply_placement(model, placement: ExpertPlacement, source: str | None = None, seed: int = 0,
                    fp8: str = "dequant") -> dict:
    """Serve ``placement`` from the next forward on. Every rank calls it at the same point (it
    runs no collective). ``source``: the checkpoint directory to read moved experts from
    (default: the one the model was loaded from), or a preset name for a model built with
    ``seed`` (then the moved experts are rebuilt from the seed). Returns what moved on this rank:
    ``{"loaded": [(layer, expert)], "dropped": [...], "bytes_read": int}``."""
    from dsv3lab.model.layers import MLP
    st = _state(model, "apply_placement")
    ctx, cfg = st.ctx, model.cfg
    E = cfg.n_routed_experts
    placement = check_placement(placement, cfg, ctx.ep, moe_layers(model))
    maps, loaded, dropped, new_modules = {}, [], [], {}
    for layer, disp in sorted(st.dispatchers.items()):
        rmap = ReplicaMap(placement.row(layer, E), E, ctx.ep)
        maps[layer] = rmap
        hosted = set(rmap.experts_on(ctx.ep_rank))
        experts = disp.moe.experts
        for e in range(E):
            if experts[e] is not None and e not in hosted:
                experts[e] = None
                dropped.append((layer, e))
            elif experts[e] is None and e in hosted:
                experts[e] = MLP(cfg.hidden_size, cfg.moe_intermediate_size, model.dtype, "meta")
                new_modules[(layer, e)] = experts[e]
                loaded.append((layer, e))
    if source is None:
        source = (getattr(model, "_dsv3_load", None) or {}).get("path")
    bytes_read = 0
    if new_modules:
        if source is not None and os.path.isdir(str(source)):
            linears = {m for mlp in new_modules.values() for m in mlp.modules() if m is not mlp}
            bytes_read = _read_experts(model, str(source), linears, fp8)
        elif source is not None:
            from dsv3lab.model.build import build
            full = build(source, seed=seed, dtype=model.dtype)
            for (layer, e), mlp in new_modules.items():
                blk = full.layers[layer] if layer < cfg.num_hidden_layers else full.mtp[layer - cfg.num_hidden_layers]
                mlp.load_state_dict(blk.mlp.experts[e].state_dict(), assign=True)
                mlp.to(model.device)
        else:
            raise LayoutError("apply_placement: experts must move but the model has no checkpoint to read "
                              "them from; pass source=DIR (or the preset name it was built from)")
    for layer, disp in st.dispatchers.items():
        disp.set_replicas(maps[layer])
    st.placement = placement
    st.sync_header()
    return dict(loaded=loaded, dropped=dropped, bytes_read=bytes_read)


def rank_loads(model, layers: list[int] | None = None) -> torch.Tensor:
    """[layers, world] pairs each rank's expert slots computed since the counters were last
    reset (the dispatchers' own counts), gathered on every rank (collective)."""
    st = _state(model, "rank_loads")
    layers = layers or sorted(st.dispatchers)
    ctx = st.ctx
    mine = torch.tensor([sum(st.dispatchers[l].comm.slot_rows) for l in layers], dtype=torch.int64,
                        device=ctx.device)
    if ctx.virtual or ctx.world_size == 1:
        return mine[:, None].cpu()
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(parts, mine)
    return torch.stack(parts, dim=1).cpu()


__all__ = ["window_load", "rebalanced_placement", "apply_placement", "rank_loads"]
