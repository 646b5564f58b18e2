"""Ready-made rank functions for ``spawn``: one forward (and optional greedy generation) under a
layout, reporting what every rank did. The notebook, the tests and the benchmark call these, so
a multi-rank run is one line:

    out = spawn(rank_run, 2, "tiny", dict(tp=2, ep=2), tokens, max_new_tokens=8)
    out["logits"], out["topk_ids"], out["generated"], out["ranks"][r]["experts"], ...

``single_run`` computes the same fields in this process without any parallelism (the reference).
``source`` is a preset name (the model is built with ``seed`` on every rank, then sharded in
memory) or a checkpoint directory (each rank loads only its slices).
"""

from __future__ import annotations

import os
import time

import torch

from dsv3lab.checkpoint.loading import rss_bytes
from dsv3lab.probes.recorder import RoutingRecorder


def _model(source, seed, dtype, ctx=None, fp8="dequant", placement=None):
    """One process: ``resolve_model``. One rank: its slices of the checkpoint, or the preset built
    with ``seed`` (the same weights on every rank) and sharded in memory."""
    from dsv3lab.model.build import build
    from dsv3lab.parallel.apply import apply_layout
    from dsv3lab.parallel.loading import load_sharded
    from dsv3lab.resolve import resolve_model
    if ctx is None:
        return resolve_model(source, dtype=dtype, seed=seed)[0]
    if os.path.isdir(str(source)):
        return load_sharded(source, ctx, dtype=dtype, fp8=fp8, placement=placement)
    return apply_layout(build(source, seed=seed, dtype=dtype), ctx, placement=placement)


def _tokens(tokens) -> torch.Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    return t[None] if t.dim() == 1 else t


def single_run(source="tiny", tokens=None, max_new_tokens: int = 0, seed: int = 0, dtype=None,
               speculative: bool = False) -> dict:
    """The one-process reference: logits [B,S,V], first-call routing ids per MoE layer, greedy ids
    (``speculative``: drafted by the MTP module and verified, the same ids as plain greedy)."""
    from dsv3lab.generate import generate
    model = _model(source, seed, dtype)
    tokens = _tokens(tokens)
    with torch.no_grad(), RoutingRecorder(model) as rec:
        logits = model(tokens)
    gen = generate(model, tokens.tolist(), max_new_tokens=max_new_tokens,
                   speculative=speculative) if max_new_tokens else None
    return dict(logits=logits, topk_ids=rec.named_topk_ids(), generated=gen)


def rank_run(rank: int, world: int, source="tiny", layout: dict | None = None, tokens=None,
             max_new_tokens: int = 0, seed: int = 0, dtype=None, fp8: str = "dequant", repeat: int = 0,
             placement=None, speculative: bool = False) -> dict:
    """One rank's part of a sharded forward (+ greedy generation). Every rank gets the same
    ``tokens`` [B,S]; data-parallel group d runs rows chunk d. Rank 0 returns the whole picture:
    logits [B,S,V] reassembled from the DP groups, routing ids per MoE layer (rank 0's group),
    generated ids (``speculative``: MTP drafts verified by the main model, under the same layout),
    and ``ranks``: one dict per rank (experts owned, parameter bytes, bytes read
    from the checkpoint, RSS, per-layer dispatch counters, timings)."""
    import torch.distributed as dist
    from dsv3lab.parallel.apply import comm_stats, param_bytes
    from dsv3lab.parallel.context import ParallelContext
    from dsv3lab.parallel.dispatch import chunk_sizes, serve
    from dsv3lab.parallel.launch import generate_parallel
    from dsv3lab.parallel.layout import Layout
    t0 = time.perf_counter()
    ctx = ParallelContext.init(Layout(**(layout or {})))
    model = _model(source, seed, dtype, ctx, fp8, placement).to(ctx.device)
    t_load = time.perf_counter() - t0
    tokens = _tokens(tokens).to(ctx.device)
    sizes = chunk_sizes(tokens.shape[0], ctx.layout.dp)
    lo = sum(sizes[:ctx.dp_rank])
    mine = tokens[lo:lo + sizes[ctx.dp_rank]]
    t1 = time.perf_counter()
    with torch.no_grad(), RoutingRecorder(model) as rec:
        logits = model(mine) if mine.shape[0] else None
        serve(model)
    t_fwd = time.perf_counter() - t1
    fwd_comm = comm_stats(model, reset=True)
    gen, t_gen = None, 0.0
    if max_new_tokens:
        t2 = time.perf_counter()
        for _ in range(max(1, repeat)):
            gen = generate_parallel(model, tokens.tolist(), max_new_tokens=max_new_tokens,
                                    stop_tokens=[] if repeat else None, speculative=speculative)
        t_gen = (time.perf_counter() - t2) / max(1, repeat)
    gen_comm = comm_stats(model)
    cfg = model.cfg
    load = getattr(model, "_dsv3_load", {}) or {}
    rss, peak = rss_bytes()
    from dsv3lab.parallel.apply import parallel_state
    slots = {layer: list(d.slot_expert) for layer, d in parallel_state(model).dispatchers.items()}
    hosted = sorted(set().union(*map(set, slots.values()))) if slots else []   # = the contiguous block without a placement
    info = dict(rank=rank, coords=ctx.layout.coords(rank), experts=hosted, slots=slots,
                param_bytes=param_bytes(model), bytes_read=load.get("bytes_read"), rss=rss, peak_rss=peak,
                forward_comm=fwd_comm, generate_comm=gen_comm, t_load=t_load, t_forward=t_fwd, t_generate=t_gen,
                tokens_in=int(mine.numel()))
    if logits is not None:
        logits = logits.cpu()
    routing = {k: v.cpu() for k, v in rec.named_topk_ids().items()}
    payload = (ctx.dp_rank, ctx.tp_rank, logits, routing if ctx.tp_rank == 0 else None, info)
    everyone = [None] * world
    dist.all_gather_object(everyone, payload) if world > 1 else everyone.__setitem__(0, payload)
    if rank != 0:
        return None
    parts = {d: lg for d, t, lg, _, _ in everyone if t == 0 and lg is not None}
    full = torch.cat([parts[d].cpu() for d in sorted(parts)]) if parts else None
    groups = sorted((d, ids) for d, t, _, ids, _ in everyone if t == 0 and ids)
    topk = {k: torch.cat([ids[k] for _, ids in groups]) for k in groups[0][1]} if groups else {}
    return dict(logits=full, topk_ids=topk, generated=gen, ranks=[e[4] for e in everyone],
                layout=ctx.layout.describe())


def rank_runs(rank: int, world: int, runs: list[dict]) -> list[dict] | None:
    """Several ``rank_run``s in one spawn (one dict of keyword arguments each; layouts and
    placements may differ): process start-up is paid once. Rank 0 returns the list of results."""
    outs = [rank_run(rank, world, **kw) for kw in runs]
    return outs if rank == 0 else None


def rebalance_run(rank: int, world: int, source="tiny", layout: dict | None = None, tokens=None,
                  redundant: int = 4, num_nodes: int = 1, num_groups: int | None = None, seed: int = 0,
                  dtype=None, placement=None, max_new_tokens: int = 0) -> dict | None:
    """EPLB's loop on a running model: trace a window (a forward of ``tokens``, DP groups taking
    their rows), plan a placement from the traced load, apply it live (moved experts re-read),
    run the same window again. Rank 0 returns logits and greedy ids before and after, the
    per-rank pairs measured by the dispatchers before and after [layers, world], EPLB's
    prediction [layers, ep], balancedness of each, the new placement and what moved per rank."""
    import dsv3lab
    import torch.distributed as dist
    from dsv3lab.parallel.apply import reset_comm_stats
    from dsv3lab.parallel.context import ParallelContext
    from dsv3lab.parallel.dispatch import chunk_sizes, serve
    from dsv3lab.parallel.launch import generate_parallel
    from dsv3lab.parallel.layout import Layout
    from dsv3lab.parallel.rebalance import apply_placement, rebalanced_placement, rank_loads, window_load
    from dsv3lab.probes.metrics import balancedness
    ctx = ParallelContext.init(Layout(**(layout or {})))
    model = _model(source, seed, dtype, ctx, placement=placement).to(ctx.device)
    tokens = _tokens(tokens).to(ctx.device)
    sizes = chunk_sizes(tokens.shape[0], ctx.layout.dp)
    lo = sum(sizes[:ctx.dp_rank])
    mine = tokens[lo:lo + sizes[ctx.dp_rank]]

    def window(trace: bool):
        reset_comm_stats(model)
        with torch.no_grad():
            if trace:
                with dsv3lab.trace(model, mtp=False) as t:
                    logits = model(mine) if mine.shape[0] else None
                    serve(model)
            else:
                t = None
                logits = model(mine) if mine.shape[0] else None
                serve(model)
        measured = rank_loads(model, layers)
        gen = generate_parallel(model, tokens.tolist(), max_new_tokens=max_new_tokens) if max_new_tokens else None
        return t, logits, measured, gen

    layers = [blk.layer for blk in model.layers if hasattr(blk.mlp, "gate")]
    t, logits_before, measured_before, gen_before = window(trace=True)
    load = window_load(t, model)
    from dsv3lab.probes.trace import Routing, gather
    merged = gather(t.record(), contribute=ctx.tp_rank == 0)           # the window's routing, on rank 0
    new, predicted = rebalanced_placement(load, model, redundant, num_nodes=num_nodes, num_groups=num_groups)
    moved = apply_placement(model, new, source=source, seed=seed)
    dist.barrier() if world > 1 else None
    _, logits_after, measured_after, gen_after = window(trace=False)

    def whole(lg):
        parts = [None] * world
        if world > 1:
            dist.all_gather_object(parts, (ctx.dp_rank, ctx.tp_rank, None if lg is None else lg.cpu()))
        else:
            parts = [(0, 0, lg.cpu())]
        got = {d: x for d, tr, x in parts if tr == 0 and x is not None}
        return torch.cat([got[d] for d in sorted(got)]) if got else None

    logits_before, logits_after = whole(logits_before), whole(logits_after)
    moves = [None] * world
    if world > 1:
        dist.all_gather_object(moves, moved)
    else:
        moves = [moved]
    if rank != 0:
        return None
    return dict(layers=predicted.pop("layers"), load=load, topk_ids=Routing(merged).topk_ids, placement=new,
                logits_before=logits_before, logits_after=logits_after,
                generated_before=gen_before, generated_after=gen_after,
                measured_before=measured_before, measured_after=measured_after,
                balancedness_measured_before=balancedness(measured_before),
                balancedness_measured_after=balancedness(measured_after), moved=moves,
                layout=ctx.layout.describe(), **predicted)
