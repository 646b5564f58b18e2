"""Cost of hook points: forward time with idle HookPoints vs HookPoints bypassed entirely.

Four variants of the same model, timed interleaved (round-robin, median of ``--reps``):
  bypassed   every HookPoint replaced by a plain Python identity (no nn.Module call at all) --
             the engine as if it had no hook points
  idle       the model as shipped: HookPoints present, nothing attached
  observed   a no-op forward hook on every HookPoint (the cost of listening everywhere)
  traced     inside ``dsv3lab.trace(model)`` (routing recorded, copied to CPU)
The claim to check: idle / bypassed is ~1.00 (within run-to-run noise).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch


class _Bypass:
    """Stands in for a HookPoint: a plain callable, not a module, never hooked (empty hook
    dicts, so ``layers.hooked`` reads it as it reads an idle HookPoint)."""
    active = False
    _forward_hooks = _forward_pre_hooks = {}

    def __call__(self, x):
        return x


def bypass_hook_points(model):
    """A deep copy of ``model`` whose HookPoints are plain identities (no module call)."""
    from dsv3lab.model.layers import HookPoint
    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        for name, child in list(mod._modules.items()):
            if isinstance(child, HookPoint):
                del mod._modules[name]
                object.__setattr__(mod, name, _Bypass())
    return m


def add_args(p) -> None:
    p.add_argument("--preset", default="lab")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--decode", type=int, default=0, metavar="CTX",
                   help="time one bf16 decode step after CTX cached tokens (batch 1) instead of a forward")


def measure(preset="lab", batch=4, seq=128, reps=15, threads=None, decode=0) -> dict:
    """``decode`` > 0: the variants time one bf16 decode step at batch 1 after ``decode`` cached
    tokens (the fused C step when nothing is hooked: its idle cost is the per-step hook checks)."""
    import dsv3lab
    from dsv3lab.probes import hook_points, hooks
    if threads:
        torch.set_num_threads(threads)
    model = dsv3lab.build(preset, seed=0, dtype=torch.bfloat16 if decode else None)
    bare = bypass_hook_points(model)
    if decode:
        batch, seq = 1, decode
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    caches = {}

    def run(m):
        with torch.no_grad():
            if not decode:
                t0 = time.perf_counter()
                m(tokens)
                return time.perf_counter() - t0
            if id(m) not in caches:                  # prefill once per model, then one step again and again
                caches[id(m)] = m.new_cache(1, decode + 1)
                m(tokens, start=0, cache=caches[id(m)])
            t0 = time.perf_counter()
            m(tokens[:, -1:], start=decode, cache=caches[id(m)])
            return time.perf_counter() - t0

    def observed():
        with hooks(model, [(None, lambda t, n: None)]):
            return run(model)

    def traced():
        with dsv3lab.trace(model):
            return run(model)

    variants = dict(bypassed=lambda: run(bare), idle=lambda: run(model), observed=observed, traced=traced)
    times = {k: [] for k in variants}
    for f in variants.values():            # warm-up
        f()
    for _ in range(reps):
        for k, f in variants.items():
            times[k].append(f())
    med = {k: statistics.median(v) for k, v in times.items()}
    # robust to machine noise: the cost of one idle HookPoint call x calls per forward
    fired = []
    with hooks(model, [(None, lambda t, n: fired.append(n))]), torch.no_grad():
        model(tokens[:, :2])
    from dsv3lab.model.layers import HookPoint
    hp, x = HookPoint("[1]"), torch.zeros(1)
    n_calls = 200_000
    t0 = time.perf_counter()
    for _ in range(n_calls):
        hp(x)
    per_call = (time.perf_counter() - t0) / n_calls
    return dict(preset=preset, batch=batch, seq=seq, reps=reps, threads=torch.get_num_threads(), decode=decode,
                hook_points=len(hook_points(model)), calls_per_forward=len(fired),
                idle_call_us=per_call * 1e6, idle_overhead_ms=per_call * len(fired) * 1e3,
                idle_overhead_fraction=per_call * len(fired) / min(times["bypassed"]),
                rows=[dict(variant=k, median_ms=med[k] * 1e3, min_ms=min(times[k]) * 1e3,
                           vs_bypassed=med[k] / med["bypassed"],
                           min_vs_bypassed=min(times[k]) / min(times["bypassed"])) for k in variants])


def run(args) -> int:
    from dsv3lab.bench import print_table, write_json_atomic
    from dsv3lab.bench.record import recorded
    res = measure(args.preset, args.batch, args.seq, args.reps, args.threads, args.decode)
    what = (f"one bf16 decode step after {res['decode']} tokens" if res["decode"]
            else f"batch {res['batch']} x {res['seq']} tokens")
    print(f"{res['preset']}: {what}, {res['hook_points']} hook points, {res['threads']} threads, median of {res['reps']}")
    print_table(res["rows"], ["variant", "median_ms", "min_ms", "vs_bypassed", "min_vs_bypassed"])
    if res["decode"]:
        print("idle: the fused decode step checks each module it reaches for hooks; idle / bypassed is that cost")
    else:
        print(f"idle HookPoint call: {res['idle_call_us']:.2f} us x {res['calls_per_forward']} calls per forward = "
              f"{res['idle_overhead_ms']:.3f} ms = {100 * res['idle_overhead_fraction']:.3f}% of the fastest bypassed forward")
    write_json_atomic(args.out or ("results/bench-hooks-decode.json" if res["decode"] else "results/bench-hooks.json"), recorded(res))
    return 0
