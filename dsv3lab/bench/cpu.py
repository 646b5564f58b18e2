"""CPU decode kernels (C) against the torch calls they replace: GEMV GB/s, latent attention GB/s,
and the whole fused decode step against the module path (tokens/s as the GB/s it streams).

For each of a preset's one-row projections (its shapes, bf16 and fp32) the C ``gemv`` against
the torch call the engine would make otherwise (``torch.mv`` in bf16, ``F.linear`` in fp32), and
for the attention of one decode token over the latent cache (the preset's heads and widths, each
context) the C kernel against torch's flash attention in both dtypes; and per dtype and context a
whole decode step of the preset, the fused step (``dsv3lab/fast/``) against the module path
(``DSV3LAB_KERNELS=torch``), its figure the bytes a step streams (activated weights and the
latent cache) per second. Weights and caches are cycled through enough copies to exceed the last-level
cache, so every figure streams from memory, as a decode step does. The measurement follows
``bench/measure.py``: rounds with the two arms alternating, a copy's bandwidth (read + write)
before each round and after the last, medians with min-max, and a figure above the copy bandwidth
flagged invalid. Results in ``results/bench-cpu.json``.

First the kernels are timed against their torch calls again (``kernels/cpu_calibrate.py``, the
verdicts the engine obeys, stored beside the library: a bench run on a quiet machine is the
measurement to keep); each row then says whether the engine uses the C kernel on this CPU, and
the run names any row where a kernel in use measured slower than torch.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from dsv3lab.bench import print_table, write_json_atomic
from dsv3lab.bench.measure import alternating_rounds, median_limits, summarize
from dsv3lab.bench.record import recorded

STREAM_BYTES: int | None = None     # copies cycled per figure (None: past the last-level cache, cpu_calibrate)


def add_args(p) -> None:
    p.add_argument("--preset", default="bench")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--contexts", default="1024,4096", help="latent cache lengths for the attention rows")
    p.add_argument("--reps", type=int, default=3, help="passes over the copies per figure and round")
    p.add_argument("--steps", type=int, default=1, help="time whole decode steps too (0: kernels only)")


def _copies(make, nbytes: int) -> list[torch.Tensor]:
    from dsv3lab.kernels.cpu_calibrate import copies
    return copies(make, nbytes, STREAM_BYTES)


def _per_call(fn, items, reps: int) -> float:
    """Seconds per call of fn(item), the best of ``reps`` passes over ``items``."""
    for it in items[:2]:
        fn(it)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best


def _copy_bandwidth() -> dict:
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    return dict(copy_GB_s=2 * src.numel() / min(ts) / 1e9)


def _decode_step_figures(cfg, args, models: dict) -> list:
    """Per dtype and context: one decode step of a random ``cfg`` model, the fused step ("C")
    against the module path ("torch": the kernel backend 'torch'), at positions ctx .. ctx+7 of
    one prefilled cache (a step rewrites its own row, so steps repeat)."""
    import dsv3lab
    from dsv3lab.kernels import backend
    from dsv3lab.stats import kv_cache_bytes_per_token, model_stats
    # the activated weights but the embedding table (one row of it is read; the head is read whole)
    streamed = model_stats(cfg)["activated_params"] - cfg.vocab_size * cfg.hidden_size
    figures = []
    for dt in (torch.bfloat16, torch.float32):
        m = models[dt] = dsv3lab.build(cfg, seed=0, dtype=dt).eval()
        for T in [int(t) for t in args.contexts.split(",") if t.strip()]:
            x = torch.randint(0, cfg.vocab_size, (1, T + 8), generator=torch.Generator().manual_seed(T))
            cache = m.new_cache(1, T + 8)
            with torch.no_grad():
                m(x[:, :T], start=0, cache=cache, last_only=True)

            def step(p, m=m, x=x, cache=cache):
                with torch.no_grad():
                    return m(x[:, p:p + 1], start=p, cache=cache, last_only=True)

            def module_step(p, step=step):
                with backend.use_backend("torch"):
                    return step(p)
            nbytes = streamed * dt.itemsize + T * kv_cache_bytes_per_token(cfg, dt)
            figures.append((f"decode step T={T}", dt, nbytes, {"C": step, "torch": module_step},
                            list(range(T, T + 8))))
    return figures


def gemv_shapes(cfg) -> list[tuple[str, int, int]]:
    """(name, N, K) of the one-row products of a decode step, by the preset's sizes."""
    H, n, r, c, v = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                     cfg.v_head_dim)
    D = cfg.hidden_size
    shapes = [("kv_a", c + r, D), ("o_proj", D, H * v), ("lm_head", cfg.vocab_size, D)]
    if cfg.q_lora_rank:
        shapes[:0] = [("q_a", cfg.q_lora_rank, D), ("q_b", H * (n + r), cfg.q_lora_rank)]
    else:
        shapes[:0] = [("q", H * (n + r), D)]
    if cfg.moe_intermediate_size:
        shapes.append(("expert up", cfg.moe_intermediate_size, D))
    return shapes


def run(args) -> int:
    import dsv3lab
    from dsv3lab.bench.engine import _cpu_features
    from dsv3lab.kernels import cpu_decode
    if not cpu_decode.available():
        raise SystemExit("bench cpu: the C decode kernels could not be built here (see the warning above)")
    from dsv3lab.fast import step_verdict
    from dsv3lab.kernels import cpu_compile, cpu_calibrate
    torch.set_num_threads(args.threads)
    print(f"bench cpu: timing the C kernels against torch for the engine's choice (-march={cpu_compile.march()}, "
          f"{args.threads} threads)")
    verdicts = cpu_calibrate.calibrate(force=True)
    print_table(cpu_calibrate.table(verdicts))
    print(cpu_calibrate.form_line())
    cfg = dsv3lab.ModelConfig.preset(args.preset)
    g = torch.Generator().manual_seed(0)
    figures = []                                  # (what, dtype, bytes per call, {arm: fn, items})
    for name, N, K in gemv_shapes(cfg):
        for dt in (torch.bfloat16, torch.float32):
            ws = _copies(lambda: (torch.randn(N, K, generator=g) * 0.05).to(dt), N * K * dt.itemsize)
            x = torch.randn(1, K, generator=g).to(dt)
            torch_fn = (lambda w, x=x: torch.mv(w, x[0])) if dt == torch.bfloat16 else (lambda w, x=x: F.linear(x, w))
            figures.append((f"gemv {name} {N}x{K}", dt, N * K * dt.itemsize,
                            {"C": (lambda w, x=x: cpu_decode.gemv(w, x)), "torch": torch_fn}, ws))
    H, D, c = cfg.num_attention_heads, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank
    for T in [int(t) for t in args.contexts.split(",") if t.strip()]:
        for dt in (torch.float32, torch.bfloat16):
            lats = _copies(lambda: torch.randn(T, D, generator=g).to(dt), T * D * dt.itemsize)
            q = (torch.randn(1, 1, H, D, generator=g) * 0.1).to(dt)

            def flash(lat, q=q):
                kv = lat[None, None]
                return F.scaled_dot_product_attention(q, kv, kv, scale=0.07)
            arms = {"torch": flash, "C": lambda lat, q=q: cpu_decode.latent_attention(q[0, 0], lat, 0.07, c)}
            figures.append((f"attention T={T} H={H}", dt, T * D * dt.itemsize, arms, lats))
    step_models = {}
    if args.steps:
        figures += _decode_step_figures(cfg, args, step_models)
    arms = ["C", "torch"]

    def measure(arm, rnd):
        rows = []
        for what, dt, nbytes, fns, items in figures:
            if arm in fns:
                t = _per_call(fns[arm], items, args.reps)
                rows.append(dict(what=f"{what} {str(dt).removeprefix('torch.')}", value=nbytes / t / 1e9,
                                 unit="GB/s", work=1.0, limit="copy_GB_s"))
        return rows

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(arms) * args.rounds, desc="bench cpu", unit="arm-round")
    except ImportError:
        bar = None
    per_arm, lims = alternating_rounds(arms, args.rounds, measure, _copy_bandwidth, bar)
    if bar is not None:
        bar.close()
    limit = median_limits(lims)
    rows = summarize(per_arm, limit)
    table = []
    for what in dict.fromkeys(r["what"] for r in rows):
        got = {r["engine"]: r for r in rows if r["what"] == what}
        ours, peer = got.get("C"), got["torch"]
        dt = torch.float32 if what.endswith("float32") else torch.bfloat16
        if what.startswith("decode step"):       # the fused step's own verdict on this model (fast/step.py)
            v = step_verdict(step_models[dt]) if dt in step_models else None
            used = v is not None and v["used"] or cpu_calibrate.mode() == "all"
        else:
            used = ours is not None and cpu_calibrate.wins("gemv" if what.startswith("gemv") else "latent_attention", dt)
        table.append(dict(what=what, C_GB_s=ours["value"] if ours else float("nan"),
                          C_range=f"{ours['lo']:.1f}-{ours['hi']:.1f}" if ours else "",
                          torch_GB_s=peer["value"], torch_range=f"{peer['lo']:.1f}-{peer['hi']:.1f}",
                          ratio=ours["value"] / peer["value"] if ours else float("nan"),
                          pct_of_copy=ours["pct_of_limit"] if ours else peer["pct_of_limit"],
                          valid=all(r["valid"] for r in got.values()), used="C" if used else "torch"))
    print(f"bench cpu: preset {cfg.name}, {args.threads} threads, {args.rounds} rounds (arms alternating); "
          f"CPU features: {_cpu_features()}; copy {limit['copy_GB_s']:.1f} GB/s read+write "
          f"(median of {len(lims)}: {min(x['copy_GB_s'] for x in lims):.1f}-{max(x['copy_GB_s'] for x in lims):.1f})")
    print_table(table)
    invalid = [t["what"] for t in table if not t["valid"]]
    if invalid:
        print(f"invalid (above the copy bandwidth measured in this run): {', '.join(invalid)}")
    slower = [t["what"] for t in table if t["used"] == "C" and t["ratio"] < 1]
    print("every C kernel in use is faster than its torch call here" if not slower else
          f"in use but slower than torch here: {', '.join(slower)} (the calibration's shape won; this one lost)")
    ratios = [t["ratio"] for t in table if t["ratio"] == t["ratio"]]
    out = args.out or "results/bench-cpu.json"
    write_json_atomic(out, recorded(dict(preset=cfg.name, threads=args.threads, rounds=args.rounds, cpu_features=_cpu_features(),
                                limits=limit, rows=table, raw=rows, calibration=verdicts, slower_in_use=slower,
                                median_ratio=statistics.median(ratios) if ratios else None)))
    print(f"wrote {out}")
    return 0
