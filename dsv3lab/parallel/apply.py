"""``apply_layout(model, ctx)``: turn a plain Transformer into one rank's share of it, in place.

What each module becomes (the official demo's split, docs/references.md#demo-parallel, with
all-to-all expert parallelism added):
  embed_tokens                   VocabParallelEmbedding (rows split over TP, all_reduce)
  self_attn.q_b_proj / q_proj    ColumnParallelLinear (this rank's heads)
  self_attn.kv_b_proj            ColumnParallelLinear (this rank's heads' W_UK, W_UV)
  self_attn.o_proj               RowParallelLinear (this rank's heads' columns, all_reduce)
  self_attn.n_heads              heads per rank; q_a, kv_a and the norms stay whole
  dense mlp / shared_experts     gate, up: ColumnParallelLinear; down: RowParallelLinear
  mlp.gate                       whole (every rank routes every token the same way)
  mlp.experts[e]                 kept on the EP ranks holding a slot of e, None elsewhere
                                 (``placement``: EPLB's physical_to_logical map; default
                                 contiguous, rank j owns [j*E/ep, (j+1)*E/ep))
  mlp.dispatch                   ExpertParallelDispatch (all-to-all, or the all-reduce baseline)
  lm_head                        VocabParallelHead (rows split over TP, all_gather)
The caches need nothing here: ``model.new_cache`` asks the attention implementation for its cache
with this rank's head count. The latent cache holds c_kv and k_pe, which every TP rank computes
whole, so each rank keeps the full (replicated) latent; the naive cache holds this rank's heads.

On a model with weights the slices are cut from the full tensors (FP8 weights with their
128-block scales; the split must then fall on block boundaries). On a meta model only shapes
change: ``dsv3lab.parallel.loading`` then fills each slice straight from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3lab.model.layers import MLP, Linear, mark_sharded
from dsv3lab.model.mla import MLA
from dsv3lab.model.moe import MoE
from dsv3lab.parallel.context import ParallelContext
from dsv3lab.parallel.dispatch import ExpertParallelDispatch
from dsv3lab.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                     VocabParallelHead)
from dsv3lab.parallel.layout import Layout, LayoutError
from dsv3lab.parallel.placement import ExpertPlacement, ReplicaMap, check_placement, moe_layers


@dataclass
class ParallelState:
    """Attached to a model as ``model._dsv3_parallel`` by ``apply_layout``."""
    ctx: ParallelContext
    dispatchers: dict = field(default_factory=dict)     # MoE layer index -> ExpertParallelDispatch
    placement: ExpertPlacement = field(default_factory=ExpertPlacement.contiguous)

    def sync_header(self) -> None:
        """One header width for every MoE layer (``serve`` answers any layer with one header)."""
        width = max((d.S_local for d in self.dispatchers.values()), default=0)
        for d in self.dispatchers.values():
            d.header_slots = width

    @property
    def layout(self) -> Layout:
        return self.ctx.layout


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def _cut(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    if t.is_meta:
        shape = list(t.shape)
        shape[dim] = stop - start
        return torch.empty(shape, dtype=t.dtype, device="meta")
    return t.narrow(dim, start, stop - start).clone()


def _shard_linear(lin: Linear, cls, dim: int, n_parts: int, part: int, block: int, **kw) -> Linear:
    """A new ``cls`` holding part ``part`` of ``n_parts`` of ``lin`` along weight dim ``dim``."""
    w = lin.weight
    full = w.shape[dim]
    size = full // n_parts
    start, stop = part * size, (part + 1) * size
    out_f, in_f = (size, lin.in_features) if dim == 0 else (lin.out_features, size)
    new = cls(in_f, out_f, (dim, start, stop), dtype=w.dtype, device="meta", **kw)
    new.weight = nn.Parameter(_cut(w, dim, start, stop), requires_grad=False)
    s = getattr(lin, "weight_scale_inv", None)
    if s is not None:
        if start % block or stop % block:
            raise LayoutError(f"FP8 weight {tuple(w.shape)} split into {n_parts} along dim {dim} gives "
                              f"[{start}, {stop}), not on {block}-blocks: its weight_scale_inv cannot be "
                              "split; load with fp8='dequant' or choose a smaller tp")
        s_new = _cut(s, dim, start // block, stop // block)
        if "weight_scale_inv" in lin._buffers:
            new.register_buffer("weight_scale_inv", s_new)
        else:
            new.weight_scale_inv = s_new
    return new


def _shard_mlp(mlp: MLP, ctx: ParallelContext, block: int) -> None:
    tp, r = ctx.tp, ctx.tp_rank
    mlp.gate_proj = _shard_linear(mlp.gate_proj, ColumnParallelLinear, 0, tp, r, block)
    mlp.up_proj = _shard_linear(mlp.up_proj, ColumnParallelLinear, 0, tp, r, block)
    mlp.down_proj = _shard_linear(mlp.down_proj, RowParallelLinear, 1, tp, r, block, group=ctx.tp_group)


def _shard_attention(mla: MLA, ctx: ParallelContext, block: int) -> None:
    tp, r = ctx.tp, ctx.tp_rank
    if hasattr(mla, "q_b_proj"):
        mla.q_b_proj = _shard_linear(mla.q_b_proj, ColumnParallelLinear, 0, tp, r, block)
    else:
        mla.q_proj = _shard_linear(mla.q_proj, ColumnParallelLinear, 0, tp, r, block)
    mla.kv_b_proj = _shard_linear(mla.kv_b_proj, ColumnParallelLinear, 0, tp, r, block)
    mla.o_proj = _shard_linear(mla.o_proj, RowParallelLinear, 1, tp, r, block, group=ctx.tp_group)
    mla.n_heads = mla.n_heads // tp


def apply_layout(model, ctx: ParallelContext | Layout, rank: int | None = None,
                 placement: ExpertPlacement | None = None):
    """Shard ``model`` (a plain ``Transformer``, with weights or on meta) for this rank, in place.

    ``ctx``: a ParallelContext (from ``ParallelContext.init``), or a Layout plus ``rank`` for a
    virtual placement (planning, or a one-rank world). ``placement``: physical expert slots per
    MoE layer (``dsv3lab.parallel.placement``); this rank keeps one module per expert its slots
    hold. Returns the model."""
    if isinstance(ctx, Layout):
        ctx = ParallelContext.virtual_for(ctx, rank or 0)
    cfg = model.cfg
    ctx.layout.validate(cfg, ctx.world_size)
    if getattr(model, "_dsv3_parallel", None) is not None:
        raise LayoutError("apply_layout: this model is already sharded "
                          f"({model._dsv3_parallel.layout.describe()}); start from a plain model")
    if not ctx.virtual or ctx.world_size == 1:
        pass
    elif not all(p.is_meta for p in model.parameters()):
        raise LayoutError("apply_layout with a virtual context (no process groups) only places meta models; "
                          "run ParallelContext.init() in each rank to shard real weights")
    block = cfg.fp8_block_size or 128
    placement = check_placement(placement, cfg, ctx.ep, moe_layers(model))
    state = ParallelState(ctx, placement=placement)
    tp = ctx.tp
    if tp > 1:
        V, D = cfg.vocab_size, cfg.hidden_size
        per = V // tp
        shard = (0, ctx.tp_rank * per, (ctx.tp_rank + 1) * per)
        old = model.embed_tokens
        emb = VocabParallelEmbedding(V, D, shard, ctx.tp_group, dtype=old.weight.dtype, device="meta")
        emb.weight = nn.Parameter(_cut(old.weight, 0, shard[1], shard[2]), requires_grad=False)
        model.embed_tokens = emb
        model.lm_head = _shard_linear(model.lm_head, VocabParallelHead, 0, tp, ctx.tp_rank, block,
                                      group=ctx.tp_group)
    for blk in list(model.layers) + list(model.mtp):
        if tp > 1:
            _shard_attention(blk.self_attn, ctx, block)
        mlp = blk.mlp
        if isinstance(mlp, MoE):
            replicas = ReplicaMap(placement.row(blk.layer, cfg.n_routed_experts), cfg.n_routed_experts, ctx.ep)
            hosted = set(replicas.experts_on(ctx.ep_rank))
            for e in range(cfg.n_routed_experts):
                if e not in hosted:
                    mlp.experts[e] = None
            if tp > 1 and mlp.shared_experts is not None:
                _shard_mlp(mlp.shared_experts, ctx, block)
            disp = ExpertParallelDispatch(mlp, ctx, blk.layer, replicas, fp8=ctx.layout.fp8_dispatch)
            mlp.dispatch = disp          # instance attribute: shadows MoE.dispatch for this module
            mark_sharded(mlp)
            state.dispatchers[blk.layer] = disp
        elif tp > 1:
            _shard_mlp(mlp, ctx, block)
    state.sync_header()
    model._dsv3_parallel = state
    mark_sharded(model)
    return model


def set_fp8_dispatch(model, on: bool = True) -> None:
    """Switch every MoE layer's dispatch between FP8 (e4m3 rows with 1x128 scales out, bf16
    back) and the model's own dtype, from the next forward on. Every rank must switch alike."""
    st = parallel_state(model)
    if st is None:
        raise LayoutError("set_fp8_dispatch: the model is not sharded (apply_layout first)")
    for d in st.dispatchers.values():
        d.set_fp8(on)


def parallel_state(model) -> ParallelState | None:
    return getattr(model, "_dsv3_parallel", None)


def comm_stats(model, reset: bool = False) -> list[dict]:
    """This rank's per-MoE-layer dispatch counters (tokens, pairs sent/received, bytes)."""
    st = parallel_state(model)
    if st is None:
        return []
    out = [d.comm.as_dict() for _, d in sorted(st.dispatchers.items())]
    if reset:
        for d in st.dispatchers.values():
            d.comm.reset()
    return out


def reset_comm_stats(model) -> None:
    comm_stats(model, reset=True)


def param_bytes(model) -> int:
    """Bytes of every parameter and buffer this rank holds."""
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.numel() * t.element_size()
    for m in model.modules():
        s = getattr(m, "weight_scale_inv", None)
        if isinstance(s, torch.Tensor) and "weight_scale_inv" not in m._buffers and id(s) not in seen:
            seen.add(id(s))
            n += s.numel() * s.element_size()
    return n
