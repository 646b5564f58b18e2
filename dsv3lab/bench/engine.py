"""dsv3lab vs transformers on one checkpoint, CPU: prefill and decode throughput, KV bytes, memory.

Both engines load the same checkpoint (the ``bench`` preset by default: V3's real MLA head dims
and 512-wide latent, 4 layers) with the same thread count. Prefill = one forward over N tokens;
decode = one new token against a cache already holding C tokens (timed over several steps).
Machine limits are measured in the same run: a plain bf16/fp32 matmul's FLOP/s (prefill is
compared to it) and a plain tensor copy's bytes/s (decode moves the activated weights plus the
cache per token and is compared to it).

The machine may be shared and noisy, so every figure is measured ``--rounds`` times with the
engines alternating round by round (A B, B A, ...) and the limits re-measured before each
round and after the last; a row reports the median over rounds with its min and max, and its
``pct_of_limit`` against the median limit. A figure above 100% of a limit is impossible, so the
bench marks that row invalid (``valid: false``) instead of printing it as a result.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import tempfile
import time

import torch

from dsv3lab.bench import print_table, write_json_atomic
from dsv3lab.bench.record import recorded
from dsv3lab.model.layers import _NATIVE_BF16


def add_args(p) -> None:
    p.add_argument("--preset", default="bench")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a random one of --preset)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--prefill", default="512,2048")
    p.add_argument("--decode", default="512,4096", help="contexts for decode")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--repeat", type=int, default=2, help="timed prefills per round (best is kept)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, engines alternating; median reported")


def _timeit(fn, repeat: int) -> float:
    fn()                                    # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def machine_limits(dtype, repeat=3) -> dict:
    """The fastest plain matmul for tensors stored in ``dtype`` (for bf16 on a CPU without bf16
    units that is upcast-then-fp32, which the engine also uses), and a plain copy's bandwidth."""
    n = 2048
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t = _timeit(lambda: a @ b, repeat)
    if dtype != torch.float32:
        t = min(t, _timeit(lambda: (a.float() @ b.float()).to(dtype), repeat))
    flops = 2 * n ** 3 / t
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = _timeit(lambda: dst.copy_(src), repeat)
    bw = 2 * src.numel() / t               # read + write
    return dict(matmul_flops=flops, copy_bytes_per_s=bw)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few ms in a thread (the
    process-wide ru_maxrss cannot separate two engines run one after the other)."""

    def __enter__(self):
        import psutil
        import threading
        self._p = psutil.Process()
        self.base = self.peak = self._p.memory_info().rss
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self._p.memory_info().rss)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def _ours(d, dtype):
    import dsv3lab
    m = dsv3lab.load(d, dtype=dtype)
    cache = {}

    def prefill(x):
        return m(x, last_only=True)

    def decode_setup(ctx, x):
        c = m.new_cache(1, ctx + 64)
        m(x[:, :ctx], start=0, cache=c, last_only=True)
        cache["c"], cache["pos"] = c, ctx

    def decode_step(tok):
        p = cache["pos"]
        m(tok, start=p, cache=cache["c"], last_only=True)
        cache["pos"] = p + 1

    def kv_bytes(ctx):
        return m.new_cache(1, ctx).nbytes()

    return m, prefill, decode_setup, decode_step, kv_bytes


def _hf(d, dtype):
    from transformers import DeepseekV3ForCausalLM
    from transformers.cache_utils import DynamicCache
    m = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).eval()
    try:
        m.set_experts_implementation("eager")
    except Exception:
        pass
    state = {}

    def prefill(x):
        return m(input_ids=x, logits_to_keep=1).logits

    def decode_setup(ctx, x):
        c = DynamicCache(config=m.config)
        m(input_ids=x[:, :ctx], cache=c, use_cache=True, logits_to_keep=1)
        state["c"], state["pos"] = c, ctx

    def decode_step(tok):
        c = state["c"]
        m(input_ids=tok, cache=c, use_cache=True, logits_to_keep=1)
        c.crop(-1)                          # keep the context fixed across timed steps

    def kv_bytes(ctx):
        c = DynamicCache(config=m.config)
        m(input_ids=torch.zeros(1, ctx, dtype=torch.long), cache=c, use_cache=True, logits_to_keep=1)
        total = 0
        for layer in c.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

    return m, prefill, decode_setup, decode_step, kv_bytes


def _cpu_features() -> str:
    from dsv3lab.kernels.cpu_compile import isa_summary
    return isa_summary()


def _measure(engine, cfg, stats, x, args, dtype, prefill_lens, decode_ctx) -> list[dict]:
    """One round of one engine: prefill throughputs and decode step rates; ``work`` is the
    FLOPs (prefill) or bytes (decode) per token, compared with ``limit``."""
    m, prefill, decode_setup, decode_step, kv_bytes = engine
    rows = []
    for n in prefill_lens:
        t = _timeit(lambda: prefill(x[:, :n]), args.repeat)
        fl = sum(_fwd_flops(stats, cfg, i) for i in range(n))
        rows.append(dict(what=f"prefill {n}", value=n / t, unit="tok/s", work=fl / n, limit="matmul_flops"))
    for ctx in decode_ctx:
        decode_setup(ctx, x)
        tok = x[:, ctx:ctx + 1]
        ts = []
        decode_step(tok)
        for _ in range(args.decode_steps):
            t0 = time.perf_counter()
            decode_step(tok)
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        rows.append(dict(what=f"decode @{ctx}", value=1 / t, unit="tok/s",
                         work=_decode_bytes(stats, cfg, ctx, dtype), limit="copy_bytes_per_s"))
    return rows


def run(args) -> int:
    import dsv3lab
    from dsv3lab.stats import model_stats
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    tmp = None
    d = args.dir
    if d is None:
        tmp = tempfile.mkdtemp(prefix="dsv3lab-bench-")
        cfg = dsv3lab.ModelConfig.preset(args.preset).replace(num_nextn_predict_layers=0)
        d = dsv3lab.save(dsv3lab.build(cfg, seed=0, dtype=torch.bfloat16), os.path.join(tmp, "ck"))
    cfg = dsv3lab.ModelConfig.from_hf(d)
    stats = model_stats(cfg)
    prefill_lens = [int(s) for s in args.prefill.split(",") if s]
    decode_ctx = [int(s) for s in args.decode.split(",") if s]
    x = torch.randint(0, cfg.vocab_size, (1, max(prefill_lens + decode_ctx) + 1),
                      generator=torch.Generator().manual_seed(0))
    makers = [("dsv3lab", _ours)] + ([] if args.no_hf else [("transformers", _hf)])
    rounds = max(1, args.rounds)
    rows, limits = [], {}
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, dname)
        lims = [machine_limits(dtype)]
        loaded, per_engine = {}, {e: {} for e, _ in makers}
        for r in range(rounds):
            order = makers if r % 2 == 0 else makers[::-1]
            if r:
                lims.append(machine_limits(dtype))
            for ename, make in order:
                with torch.no_grad():
                    if ename not in loaded:            # first round: loading counts in peak memory
                        gc.collect()
                        with PeakRSS() as mem:
                            loaded[ename] = make(d, dtype)
                            got = _measure(loaded[ename], cfg, stats, x, args, dtype, prefill_lens, decode_ctx)
                        kvb = loaded[ename][4](256) // 256
                        got += [dict(what="kv cache", value=float(kvb), unit="B/token"),
                                dict(what="peak memory", value=mem.mb, unit="MB")]
                    else:
                        got = _measure(loaded[ename], cfg, stats, x, args, dtype, prefill_lens, decode_ctx)
                for g in got:
                    per_engine[ename].setdefault(g["what"], []).append(g)
        lims.append(machine_limits(dtype))
        lim = {k: statistics.median(v[k] for v in lims) for k in lims[0]}
        limits[dname] = dict(lim, rounds=lims)
        for ename, _ in makers:
            for what, got in per_engine[ename].items():
                vals = [g["value"] for g in got]
                row = dict(dtype=dname, engine=ename, what=what, value=statistics.median(vals),
                           lo=min(vals), hi=max(vals), unit=got[0]["unit"], rounds=len(vals),
                           pct_of_limit=float("nan"))
                if "work" in got[0]:
                    row["pct_of_limit"] = 100 * row["value"] * got[0]["work"] / lim[got[0]["limit"]]
                row["valid"] = not row["pct_of_limit"] > 100
                rows.append(row)
        del loaded
        gc.collect()
    # ratios against transformers measured in this run
    by = {(r["dtype"], r["engine"], r["what"]): r for r in rows}
    for r in rows:
        peer = by.get((r["dtype"], "transformers", r["what"]))
        # throughput: higher is better; cache bytes and memory: the ratio is ours / theirs
        r["vs_transformers"] = r["value"] / peer["value"] if peer and peer["value"] else float("nan")
    name = args.preset if args.dir is None else os.path.basename(os.path.abspath(d))
    print(f"\ndsv3lab bench engine: {name}, {threads} threads, {platform.processor() or platform.machine()}, "
          f"CPU features: {_cpu_features()}; bf16 policy: {'native' if _NATIVE_BF16 else 'upcast'}; "
          f"median of {rounds} rounds, engines alternating")
    for k, v in limits.items():
        lo_f = min(x["matmul_flops"] for x in v["rounds"]) / 1e12
        hi_f = max(x["matmul_flops"] for x in v["rounds"]) / 1e12
        lo_b = min(x["copy_bytes_per_s"] for x in v["rounds"]) / 1e9
        hi_b = max(x["copy_bytes_per_s"] for x in v["rounds"]) / 1e9
        print(f"  {k}: matmul {v['matmul_flops'] / 1e12:.2f} TFLOP/s ({lo_f:.2f}-{hi_f:.2f}), "
              f"copy {v['copy_bytes_per_s'] / 1e9:.1f} GB/s ({lo_b:.1f}-{hi_b:.1f}), {len(v['rounds'])} measurements")
    text = print_table(rows, ["dtype", "engine", "what", "value", "lo", "hi", "unit", "vs_transformers",
                              "pct_of_limit", "valid"])
    bad = [r for r in rows if not r["valid"]]
    if bad:
        print(f"INVALID: {len(bad)} figure(s) above 100% of a machine limit measured in this run "
              "(the machine's speed changed during the run); rerun on a quieter machine")
    out = args.out or os.path.join("results", "bench-engine.json")
    write_json_atomic(out, recorded(dict(preset=name, threads=threads, rounds=rounds, cpu_features=_cpu_features(),
                                bf16_policy="native" if _NATIVE_BF16 else "upcast",
                                limits=limits, rows=rows, table=text)))
    print(f"wrote {out}")
    return 0


def _fwd_flops(stats, cfg, pos: int) -> float:
    """Forward FLOPs of the token at ``pos`` in a causal prefill (matmuls + attention over pos+1)."""
    matmul = 2 * (stats["activated_params"] - stats["embedding_params"])
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (pos + 1)
    return matmul + attn


def _decode_bytes(stats, cfg, ctx: int, dtype) -> float:
    """Bytes one decode step must read: activated weights (no embedding table) + latent cache."""
    size = torch.tensor([], dtype=dtype).element_size()
    weights = (stats["activated_params"] - stats["embedding_params"]) * size
    cache = ctx * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * size
    return weights + cache


# Public names for the other bench targets that measure the same way (bench peers).
measure_round, dsv3lab_engine, cpu_features = _measure, _ours, _cpu_features
prefill_flops, decode_bytes = _fwd_flops, _decode_bytes
