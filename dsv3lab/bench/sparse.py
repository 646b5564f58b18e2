"""DSA sparse decode against dense absorbed decode of the same V3.2 model, at long contexts.

One model (the ``bench`` preset -- V3's MLA head dims and 512-wide latent, 4 layers -- plus a
lightning indexer of ``--index-heads`` x ``--index-dim``, the official 128-wide heads, half as many
as MLA's as in V3.2, and the official ``index_topk`` 2048), one cache per context holding C tokens,
one new token per step (each at the next position: the context grows by one per step, as in
generation). "dense" is the same model and cache with the indexer ignored
(``set_attn_mode("absorbed")``: every latent row is read); "sparse" scores all C indexer keys and
attends to the 2048 selected latent rows. The two alternate within every round; each figure is
the median over rounds of the mean step time; "attn" columns are the part of the step spent inside
the MLA modules (projections, indexer, core attention: what DSA changes), the rest (MoE, norms,
head) being the same in both.

The caches are filled with random values (unit-scale, like the post-norm latent and the
LayerNorm'd indexer keys) instead of a real prefill: a step's cost does not depend on what the
rows hold, and prefilling 32K tokens through a 2-core CPU would take longer than the benchmark.
Alongside the times: the cost model's attention bytes per step (``probes.dsa_cost``), and a
straight-line fit of step time against context for each mode (``cost_fit``): the sparse step's
fixed cost above dense's -- what it pays at any context (indexer projections, top-k, the gather,
attention over k rows) -- and what each 1K tokens of context adds to each.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from dsv3lab.bench import print_table, write_json_atomic
from dsv3lab.bench.record import recorded


def add_args(p) -> None:
    p.add_argument("--preset", default="bench")
    p.add_argument("--contexts", default="8192,16384,32768")
    p.add_argument("--index-topk", type=int, default=2048)
    p.add_argument("--index-heads", type=int, default=8)
    p.add_argument("--index-dim", type=int, default=128)
    p.add_argument("--key-format", default="bf16", choices=["model", "bf16", "fp8"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="decode steps timed per round and mode")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


# positions after the context that a cache from ``filled_cache`` leaves for decoding (enough for
# ``time_decode`` with rounds x (2 steps + 1) <= 31; ``decode_room`` says what a run needs)
DECODE_ROOM = 64


def decode_room(rounds: int, steps: int) -> int:
    """Cache positions ``time_decode`` decodes into after the context."""
    return 2 * rounds * (2 * steps + 1)


def bench_model(preset: str, contexts, index_topk: int, index_heads: int, index_dim: int,
                dtype=torch.bfloat16, seed: int = 0, layers: int | None = None, room: int = DECODE_ROOM):
    """The V3.2 variant of ``preset`` used here (random weights, no MTP; ``layers`` overrides
    the preset's layer count), with positions for ``room`` tokens after the longest context."""
    import dsv3lab
    base = dsv3lab.ModelConfig.preset(preset)
    if layers:
        base = base.replace(num_hidden_layers=layers, first_k_dense_replace=min(base.first_k_dense_replace, layers))
    cfg = base.replace(index_n_heads=index_heads, index_head_dim=index_dim, index_topk=index_topk,
                       max_position_embeddings=max(max(contexts) + room, base.max_position_embeddings),
                       num_nextn_predict_layers=0, name=f"{preset}-dsa")
    return dsv3lab.build(cfg, seed=seed, dtype=dtype)


def filled_cache(model, ctx: int, seed: int = 0, room: int = DECODE_ROOM):
    """A sparse cache of one sequence whose first ``ctx`` positions hold random unit-scale rows,
    with ``room`` more positions for the tokens decoded after them."""
    cache = model.new_cache(1, ctx + room, mode="sparse")
    g = torch.Generator().manual_seed(seed)
    for buf in cache.layers:
        buf[:, :ctx].copy_(torch.randn(buf[:, :ctx].shape, generator=g))
    for buf in cache.index_keys.layers:
        if isinstance(buf, tuple):                            # fp8: values and their scales
            from dsv3lab.fp8 import act_quant
            from dsv3lab.model.indexer import fp8_block
            q, s = act_quant(torch.randn(buf[0][:, :ctx].shape, generator=g), fp8_block(buf[0].shape[-1]))
            buf[0][:, :ctx].copy_(q)
            buf[1][:, :ctx].copy_(s)
        else:
            buf[:, :ctx].copy_(torch.randn(buf[:, :ctx].shape, generator=g))
    return cache


class _AttentionClock:
    """Wall time spent inside the MLA modules (projections, indexer, core attention) of a forward."""

    def __init__(self, model):
        from dsv3lab.model.mla import MLA
        self.total, self._t0, self._h = 0.0, 0.0, []
        for m in model.modules():
            if isinstance(m, MLA):
                self._h.append(m.register_forward_pre_hook(self._start))
                self._h.append(m.register_forward_hook(self._stop))

    def _start(self, *a):
        self._t0 = time.perf_counter()

    def _stop(self, *a):
        self.total += time.perf_counter() - self._t0

    def remove(self):
        for h in self._h:
            h.remove()


def time_decode(model, cache, ctx: int, rounds: int, steps: int, progress=None) -> dict:
    """Median seconds per decode step after ``ctx`` cached tokens for dense and sparse,
    alternating: the whole step ("dense", "sparse") and the part spent in attention ("attn_dense",
    "attn_sparse"). Every step decodes the next position, as generation does (the context grows by
    one per step, so nothing shape-keyed can be reused from the step before); the cache needs
    ``decode_room(rounds, steps)`` positions after the context."""
    if ctx + decode_room(rounds, steps) > cache.max_len:
        raise ValueError(f"time_decode: {rounds} rounds x {steps} steps decode {decode_room(rounds, steps)} "
                         f"tokens after the {ctx} cached, but the cache holds {cache.max_len} positions; "
                         f"make it with filled_cache(model, ctx, room=decode_room(rounds, steps))")
    tok = torch.tensor([[1]], device=model.device)
    times = {"dense": [], "sparse": [], "attn_dense": [], "attn_sparse": []}
    pos = ctx
    with torch.no_grad():
        for r in range(rounds):
            for name in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
                model.set_attn_mode("absorbed" if name == "dense" else "sparse")
                model(tok, start=pos, cache=cache, last_only=True)          # warm this path
                pos += 1
                t0 = time.perf_counter()
                for _ in range(steps):
                    model(tok, start=pos, cache=cache, last_only=True)
                    pos += 1
                times[name].append((time.perf_counter() - t0) / steps)
                # the attention share in steps of their own: the clock's module hooks send a step
                # down the module path (the fused bf16 step runs only with nothing hooked)
                clock = _AttentionClock(model)
                for _ in range(steps):
                    model(tok, start=pos, cache=cache, last_only=True)
                    pos += 1
                clock.remove()
                times["attn_" + name].append(clock.total / steps)
            if progress is not None:
                progress.update(1)
    model.set_attn_mode("sparse")
    return {k: statistics.median(v) for k, v in times.items()} | {"all": times}


def cost_fit(rows) -> dict | None:
    """Least-squares step time = fixed + per_1k x (context / 1024), in ms, for dense and sparse
    (from two or more contexts): what the sparse step pays at any context ("fixed", above dense's
    fixed part) and what it adds per 1K tokens of context against dense."""
    if len({r["context"] for r in rows}) < 2:
        return None
    x = [r["context"] / 1024 for r in rows]
    fit = {}
    for mode in ("dense", "sparse"):
        per_1k, fixed = statistics.linear_regression(x, [1e3 / r[f"{mode}_tok_s"] for r in rows])
        fit[mode] = dict(fixed_ms=fixed, per_1k_ms=per_1k)
    fit["sparse_fixed_above_dense_ms"] = fit["sparse"]["fixed_ms"] - fit["dense"]["fixed_ms"]
    return fit


def run(args) -> int:
    from tqdm.auto import tqdm

    from dsv3lab.model.attn_sparse import set_key_format
    from dsv3lab.model.layers import _NATIVE_BF16
    from dsv3lab.probes.dsa_cost import attention_cost
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(s) for s in args.contexts.split(",") if s]
    dtype = getattr(torch, args.dtype)
    room = decode_room(args.rounds, args.steps)
    model = bench_model(args.preset, contexts, args.index_topk, args.index_heads, args.index_dim,
                        dtype, args.seed, room=room).eval()
    set_key_format(model, args.key_format)
    cfg = model.cfg
    el = torch.tensor([], dtype=dtype).element_size()
    rows = []
    with tqdm(total=len(contexts) * args.rounds, desc="bench sparse", disable=None) as bar:
        for ctx in contexts:
            cache = filled_cache(model, ctx, args.seed, room)
            t = time_decode(model, cache, ctx, args.rounds, args.steps, bar)
            kw = dict(key_format=args.key_format, dtype_bytes=el)
            dense = attention_cost(cfg, ctx, "decode", sparse=False, **kw)
            sparse = attention_cost(cfg, ctx, "decode", sparse=True, **kw)
            L = cfg.num_hidden_layers
            rows.append(dict(context=ctx, dense_tok_s=1 / t["dense"], sparse_tok_s=1 / t["sparse"],
                             speedup=t["dense"] / t["sparse"],
                             attn_ms_dense=1e3 * t["attn_dense"], attn_ms_sparse=1e3 * t["attn_sparse"],
                             attn_speedup=t["attn_dense"] / t["attn_sparse"],
                             attn_MB_dense=dense["bytes"] * L / 1e6, attn_MB_sparse=sparse["bytes"] * L / 1e6,
                             attn_MFLOP_dense=dense["flops"] * L / 1e6, attn_MFLOP_sparse=sparse["flops"] * L / 1e6,
                             dense_s=t["all"]["dense"], sparse_s=t["all"]["sparse"]))
            del cache
    threads = torch.get_num_threads()
    print(f"\ndsv3lab bench sparse: {cfg.name} (indexer {cfg.index_n_heads} x {cfg.index_head_dim}, "
          f"top-{cfg.index_topk}, {args.key_format} keys), {args.dtype}, {threads} threads, "
          f"{platform.processor() or platform.machine()}, CPU bf16 units: {'yes' if _NATIVE_BF16 else 'no'}; "
          f"medians of {args.rounds} alternating rounds x {args.steps} steps")
    text = print_table(rows, ["context", "dense_tok_s", "sparse_tok_s", "speedup", "attn_ms_dense",
                              "attn_ms_sparse", "attn_speedup", "attn_MB_dense", "attn_MB_sparse",
                              "attn_MFLOP_dense", "attn_MFLOP_sparse"])
    fit = cost_fit(rows)
    if fit is not None:
        d, sp = fit["dense"], fit["sparse"]
        line = (f"step time fit: dense {d['fixed_ms']:.1f} ms + {d['per_1k_ms']:.2f} ms per 1K tokens, "
                f"sparse {sp['fixed_ms']:.1f} ms + {sp['per_1k_ms']:.2f} ms per 1K tokens "
                f"(sparse fixed cost above dense: {fit['sparse_fixed_above_dense_ms']:.1f} ms per step)")
        print(line)
        text += "\n" + line
    out = args.out or os.path.join("results", "bench-sparse.json")
    write_json_atomic(out, recorded(dict(preset=cfg.name, threads=threads, dtype=args.dtype, key_format=args.key_format,
                                index=dict(heads=cfg.index_n_heads, dim=cfg.index_head_dim, topk=cfg.index_topk),
                                rounds=args.rounds, steps=args.steps, rows=rows, fit=fit, table=text)))
    print(f"wrote {out}")
    return 0
