"""Which C decode kernels beat the torch calls they replace on this CPU: measured, cached, obeyed.

A C kernel is worth running only where it is faster than the torch call it stands in for, and
that depends on the CPU: on an AVX512-BF16/AMX machine the C bf16 GEMV streams weights at ~2x
``torch.mv``'s rate, on an AVX2-only one torch's own AVX2 GEMV can be as fast. So the first time
the engine asks (``cpu_decode.enabled(..., kernel=name)``) for a library tier and thread count,
each kernel is timed against its torch call on decode-sized operands -- the two arms
alternating, ``ROUNDS`` rounds, medians, the weights cycled through copies larger than the
last-level cache so that both stream from memory as in a decode step -- and the verdicts are
written beside the library (``<library>.calibration.json``, atomically), so later processes
read them. A kernel is used where its median time is below torch's.

  DSV3LAB_CPU_KERNELS=measured   (default) each kernel where it measured faster
  DSV3LAB_CPU_KERNELS=all        every kernel regardless (tests: the C paths must be exercised
                                 on every CPU, whatever they measure there)

``dsv3lab info`` and ``dsv3lab bench cpu`` print the verdicts (``table()``); ``calibrate(force=True)``
measures again (a noisy first measurement, e.g. taken while the machine was busy, is replaced).
The fused decode step (``dsv3lab/fast/step.py``) replaces the module path as a whole, so it is
timed against it as a whole on each model's first decode step (``fast.step_verdict``); inside
it, the C latent attention runs only where ``latent_attention`` won here (``latent_attention_short``
for a cache below the rows at which torch's pass is split over the threads), V3.2's C selection and
gather where ``index_select``/``index_scores``/``gather`` did. A kept FP8 weight's one-row
product takes ``gemv_fp8`` where it won, a prefill's bands ``dequant_fp8``; a model with weights kept FP8 takes the fused step only
where ``moe_fp8`` (its experts read as stored in one call) won against torch's path.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from . import cpu_compile, cpu_decode, cpu_sparse

# (kernel, dtype) pairs measured; the engine names the kernel, the dtype is the tensors'
KERNELS = {
    "gemv": (torch.bfloat16, torch.float32),
    "moe": (torch.bfloat16, torch.float32),
    "rmsnorm": (torch.bfloat16, torch.float32),
    "rope": (torch.bfloat16, torch.float32),
    "route": (torch.float32,),
    "gemv_fp8": (torch.bfloat16, torch.float32),    # the activation's dtype; weights e4m3 as stored
    "moe_fp8": (torch.bfloat16, torch.float32),     # the fused MoE call with experts kept FP8 (the fused step)
    "dequant_fp8": (torch.bfloat16, torch.float32),  # a kept FP8 weight's band dequantized for a prefill's GEMM
    "index_scores": (torch.bfloat16,),
    "latent_attention": (torch.bfloat16, torch.float32),        # 4096 rows: torch's pass split over the threads
    "latent_attention_short": (torch.bfloat16, torch.float32),  # 1024 rows: torch's pass on one thread
    "index_select": (torch.bfloat16,),      # cpu_sparse: V3.2's top-k of the indexer's logits
    "gather": (torch.bfloat16,),            # cpu_sparse: the selected latent rows
}
ROUNDS = 5
# bytes of copies of an operand cycled per timing, so that each call reads it from memory as a
# decode step does (it streams the weights once a token), not from a cache holding all of them:
# None = 1.5x the last-level cache, within [STREAM_MIN, STREAM_MAX] (a Xeon VM with a 480 MB L3
# held the old fixed 48 MB whole)
STREAM_BYTES: int | None = None
STREAM_MIN, STREAM_MAX = 48 << 20, 1 << 30
MODES = ("measured", "all")


def mode() -> str:
    m = os.environ.get("DSV3LAB_CPU_KERNELS", "measured").strip().lower() or "measured"
    if m not in MODES:
        raise ValueError(f"DSV3LAB_CPU_KERNELS must be one of {MODES}, got {m!r}")
    return m


def key(kernel: str, dtype: torch.dtype) -> str:
    return f"{kernel} {str(dtype).removeprefix('torch.')}"


def wins(kernel: str, dtype: torch.dtype) -> bool:
    """Whether the C ``kernel`` runs for ``dtype`` tensors on this CPU (module docstring)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown C kernel {kernel!r}; one of {sorted(KERNELS)}")
    if mode() == "all":
        return True
    if _measuring:                          # engine code inside an arm being timed runs torch's path
        return False
    if kernel == "route":
        dtype = torch.float32               # the router's scores are fp32 whatever the model's dtype
    v = verdicts().get(key(kernel, dtype))
    return bool(v and v["use"])


def verdicts() -> dict:
    """{"gemv bfloat16": {"c_us", "torch_us", "speedup", "use"}, ...} for the current tier and
    thread count: read from the cache beside the library, measured (once) if absent; {} when the
    library cannot be built."""
    return _verdicts(cpu_compile.march(), torch.get_num_threads())


def _cache_file(tier: str):
    cc = cpu_compile.compiler()
    if cc is None:
        return None
    return cpu_compile.library_path(cpu_decode.SOURCE, tier, cc).with_suffix(".calibration.json")


def _read(path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write(path, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def _verdicts(tier: str, threads: int) -> dict:
    if cpu_decode.library() is None:
        return {}
    path = _cache_file(tier)
    data = _read(path) if path else {}
    cached, form = data.get(str(threads)), data.get(FORM, {}).get(str(threads))
    if (cached and set(cached) >= {key(k, d) for k, ds in KERNELS.items() for d in ds}
            and (form or not form_choice())):
        _apply_form(form)
        return cached
    return _measure(tier, threads, ROUNDS)


# --- the e4m3 form, where the tier has two (kernels/cpu/decode_bf16.c, dsv3_e4m3_lifted)

FORM = "e4m3 form"               # the cache file's entry: {threads: {"lifted_us", "f16c_us", "speedup", "use"}}


def form_choice() -> bool:
    """Whether this tier's library widens e4m3 in two vector forms to choose from (AVX2 with F16C:
    the lifted one and F16C's conversion)."""
    prev = cpu_decode.e4m3_lifted()
    both = cpu_decode.e4m3_lifted(True) and not cpu_decode.e4m3_lifted(False)
    cpu_decode.e4m3_lifted(prev)
    return both


def form_verdict() -> dict | None:
    """The measured choice of e4m3 form for the current tier and thread count (None where the
    tier has one form, or it is not measured yet)."""
    path = _cache_file(cpu_compile.march())
    return (_read(path).get(FORM, {}).get(str(torch.get_num_threads()))) if path else None


def _apply_form(form: dict | None) -> None:
    if form is not None:
        cpu_decode.e4m3_lifted(form["use"])


def _measure_form(rounds: int) -> dict | None:
    """The FP8 MoE call (``moe_fp8``'s operands: Gaussian weights cast to e4m3 unscaled, about a
    quarter of them subnormal) in the lifted form against F16C's. The lifted form makes e4m3's
    subnormals fp32 subnormals, multiplied at full rate on AMD cores and by microcode assist on
    Intel's, so weights with subnormals pick the form that is fast on any weights: on an AVX2
    EPYC the lifted one, on a Xeon F16C's."""
    if not form_choice():
        return None
    c_fn, _, items = _arms("moe_fp8", torch.bfloat16)

    def lifted(it):
        cpu_decode.e4m3_lifted(True)
        return c_fn(it)

    def f16c(it):
        cpu_decode.e4m3_lifted(False)
        return c_fn(it)
    lt, ft = _alternating(lifted, f16c, items, rounds)
    form = dict(lifted_us=lt * 1e6, f16c_us=ft * 1e6, speedup=ft / lt, use=bool(lt < ft))
    _apply_form(form)
    return form


def form_line(form: dict | None = None) -> str:
    """One line saying which e4m3 form runs and what was measured (``dsv3lab info``, ``bench cpu``)."""
    form = form_verdict() if form is None else form
    if form is None:
        return ("e4m3 form: " + ("lifted or F16C, not measured yet" if form_choice() else
                                 "one vector form on this tier"))
    return (f"e4m3 form: {'lifted' if form['use'] else 'F16C'} (the FP8 MoE call lifted {form['lifted_us']:.0f} us, "
            f"F16C {form['f16c_us']:.0f} us)")


def calibrate(force: bool = False, rounds: int = ROUNDS) -> dict:
    """The verdicts at the current tier and thread count; with ``force``, measured again (and
    stored beside the library) even when cached."""
    tier, threads = cpu_compile.march(), torch.get_num_threads()
    if not force:
        return _verdicts(tier, threads)
    result = _measure(tier, threads, rounds)
    _verdicts.cache_clear()
    return result


_measuring = False


def _measure(tier: str, threads: int, rounds: int) -> dict:
    """Every kernel against its torch call; the verdicts stored beside the library. While it
    runs, ``wins`` says no: engine code that asks for verdicts must not start another measurement."""
    global _measuring
    if cpu_decode.library() is None:
        return {}
    _measuring = True
    try:
        return _measure_all(tier, threads, rounds)
    finally:
        _measuring = False


def _measure_all(tier: str, threads: int, rounds: int) -> dict:
    if cpu_decode.library() is None:
        return {}
    warnings.warn(f"dsv3lab: timing the C decode kernels against torch on this CPU ({cpu_compile.isa_summary()}, "
                  f"-march={tier}, {threads} threads; once, cached beside the library)", stacklevel=3)
    result = {}
    with torch.no_grad():
        # the e4m3 form first: the FP8 kernels' verdicts below are then the chosen form's
        form = _measure_form(rounds)
        for kernel, dtypes in KERNELS.items():
            for dt in dtypes:
                if kernel in ("index_select", "gather") and cpu_sparse.library() is None:
                    result[key(kernel, dt)] = dict(c_us=float("nan"), torch_us=float("nan"), speedup=float("nan"),
                                                   use=False)
                    continue
                c_fn, t_fn, items = _arms(kernel, dt)
                c_t, t_t = _alternating(c_fn, t_fn, items, rounds)
                result[key(kernel, dt)] = dict(c_us=c_t * 1e6, torch_us=t_t * 1e6, speedup=t_t / c_t,
                                               use=bool(c_t < t_t))
    path = _cache_file(tier)
    if path is not None:
        data = _read(path)
        data[str(threads)] = result
        if form is not None:
            data.setdefault(FORM, {})[str(threads)] = form
        data["cpu"] = cpu_compile.isa_summary()
        try:
            _write(path, data)
        except OSError:
            pass                         # a read-only cache: the verdicts hold for this process
    return result


def cached() -> dict:
    """The verdicts stored for the current tier and thread count, without measuring ({} if none)."""
    path = _cache_file(cpu_compile.march())
    return (_read(path).get(str(torch.get_num_threads())) or {}) if path else {}


def table(verdicts_: dict | None = None) -> list[dict]:
    """The verdicts (default: ``verdicts()``) as rows for a printed table (``dsv3lab info
    --kernels``, ``bench cpu``)."""
    rows = verdicts() if verdicts_ is None else verdicts_
    return [dict(kernel=k, C_us=v["c_us"], torch_us=v["torch_us"], speedup=v["speedup"],
                 used="yes" if v["use"] or mode() == "all" else "no: torch's call")
            for k, v in rows.items() if isinstance(v, dict)]


# --- the two arms of each kernel: decode-sized operands, the torch call the engine makes otherwise

def stream_bytes(setting: int | None = None) -> int:
    """Bytes of copies to cycle through: ``setting`` (else ``STREAM_BYTES``) where given, else
    1.5x the last-level cache (32 MB where unknown) within [STREAM_MIN, STREAM_MAX]."""
    s = STREAM_BYTES if setting is None else setting
    if s is not None:
        return s
    return min(STREAM_MAX, max(STREAM_MIN, 3 * (cpu_compile.llc_bytes() or 32 << 20) // 2))


def _clone(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def copies(make, nbytes: int, total: int | None = None) -> list:
    """``make()`` (operands of ``nbytes``) and clones of it, ``stream_bytes(total)`` in all, at
    least two: cycled through by a timing. Clones rather than new draws: the same values in other
    memory time the same, and drawing a large cache's worth of random numbers takes seconds."""
    first = make()
    return [first] + [_clone(first) for _ in range(max(2, -(-stream_bytes(total) // max(1, nbytes))) - 1)]



def _arms(kernel: str, dt: torch.dtype):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt)

    if kernel == "gemv":                     # a 2048 x 2048 projection of one token
        N = K = 2048
        x = rand(1, K)
        torch_mv = (lambda w: torch.mv(w, x[0])) if dt == torch.bfloat16 else (lambda w: F.linear(x, w))
        return (lambda w: cpu_decode.gemv(w, x)), torch_mv, copies(lambda: rand(N, K, s=0.05), N * K * dt.itemsize)
    if kernel == "gemv_fp8":                 # a 2048 x 2048 e4m3 projection of one token, 128x128 scales
        N = K = 2048
        x = rand(1, K)

        def make():
            w = (torch.randn(N, K, generator=g) * 0.05).to(torch.float8_e4m3fn)
            return w, torch.rand(N // 128, K // 128, generator=g) + 0.5

        def torch_fp8(ws):
            # the torch path (dsv3lab/fp8.py): the blocks dequantized into x's dtype, then the GEMV
            w, s = ws
            deq = (w.float().view(N // 128, 128, K // 128, 128) * s[:, None, :, None]).view(N, K).to(dt)
            return torch.mv(deq, x[0]) if dt == torch.bfloat16 else F.linear(x, deq)
        return (lambda ws: cpu_decode.gemv_fp8(ws[0], ws[1], x, dt)), torch_fp8, copies(make, N * K)
    if kernel == "dequant_fp8":              # a 2048 x 2048 e4m3 weight into x's dtype (a prefill's band)
        N = K = 2048

        def make():
            w = (torch.randn(N, K, generator=g) * 0.05).to(torch.float8_e4m3fn)
            return w, torch.rand(N // 128, K // 128, generator=g) + 0.5

        def torch_deq(ws):
            w, s = ws
            return (w.float().view(N // 128, 128, K // 128, 128) * s[:, None, :, None]).view(N, K).to(dt)
        return (lambda ws: cpu_decode.dequant_fp8(ws[0], ws[1], dt)), torch_deq, copies(make, N * K)
    if kernel == "moe_fp8":                  # one token through 6 e4m3 experts of 1024 -> 512 -> 1024
        K, inter, n = 1024, 512, 6
        x = rand(K)
        ws = torch.rand(n, generator=g)
        def e4m3(rows, cols):                  # a stored FP8 weight: e4m3 values and a 128x128 scale grid
            return ((torch.randn(rows, cols, generator=g) * 0.05).to(torch.float8_e4m3fn),
                    torch.rand(rows // 128, cols // 128, generator=g) + 0.5)

        def expert_set():
            return [[e4m3(*shape) for shape in ((inter, K), (inter, K), (K, inter))] for _ in range(n)]

        def c_moe(es):
            return cpu_decode.moe(x, *[[e[j][0] for e in es] for j in range(3)], ws,
                                  scales=[tuple(p[1] for p in e) for e in es])

        def deq(q, sc):
            # torch's dequantization as dsv3lab/fp8.py does it without the C kernels (fp8._dequant_band
            # itself asks for the verdicts: calling it here, while they are measured, would recurse)
            M, N = q.shape
            return (q.float().view(M // 128, 128, N // 128, 128) * sc[:, None, :, None]).view(M, N).to(dt)

        def torch_moe(es):
            # the module path's torch arm: each weight dequantized into x's dtype, then the GEMV
            y = torch.zeros(K, dtype=torch.float32)
            for s, e in enumerate(es):
                gw, uw, dw = (deq(q, sc) for q, sc in e)
                h = F.silu(F.linear(x, gw)) * F.linear(x, uw)
                y += ws[s] * F.linear(h, dw).float()
            return y
        return c_moe, torch_moe, copies(expert_set, 3 * n * inter * K)
    if kernel == "moe":                      # one token through 6 experts of 1024 -> 512 -> 1024
        K, inter, n = 1024, 512, 6
        x = rand(K)
        ws = torch.rand(n, generator=g)

        def expert_set():
            return [(rand(inter, K, s=0.05), rand(inter, K, s=0.05), rand(K, inter, s=0.05)) for _ in range(n)]

        def c_moe(es):
            return cpu_decode.moe(x, [e[0] for e in es], [e[1] for e in es], [e[2] for e in es], ws)

        def torch_moe(es):
            y = torch.zeros(K, dtype=torch.float32)
            for s, (gw, uw, dw) in enumerate(es):
                if dt == torch.bfloat16:
                    h = F.silu(torch.mv(gw, x)) * torch.mv(uw, x)
                    y += ws[s] * torch.mv(dw, h).float()
                else:
                    h = F.silu(F.linear(x, gw)) * F.linear(x, uw)
                    y += ws[s] * F.linear(h, dw)
            return y
        return c_moe, torch_moe, copies(expert_set, 3 * n * inter * K * dt.itemsize)
    if kernel == "rmsnorm":                  # one token's hidden state
        D = 2048
        w = rand(D)
        xs = [rand(1, D) for _ in range(8)]
        return ((lambda x: cpu_decode.rmsnorm(x, w, 1e-6)),
                (lambda x: w * F.rms_norm(x.float(), (D,), eps=1e-6).to(dt)), xs)
    if kernel == "rope":                     # 16 heads x 64 rotary dims at one position
        H, d = 16, 64
        cos, sin = torch.rand(1, d // 2, generator=g), torch.rand(1, d // 2, generator=g)
        xs = [rand(1, 1, H, d) for _ in range(8)]

        def torch_rope(x):
            xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
            return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).to(dt)
        return (lambda x: cpu_decode.rope(x, cos, sin)), torch_rope, xs
    if kernel == "route":                    # 256 experts in 8 groups, top-4 groups, top-8 experts
        E, G, tg, k = 256, 8, 4, 8
        bias = torch.randn(E, generator=g) * 0.01
        xs = [torch.rand(1, E, generator=g) for _ in range(8)]

        def torch_route(s):
            choice = s + bias
            groups = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
            keep = groups.topk(tg, dim=-1).indices
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~mask[:, :, None].expand(-1, G, E // G).reshape(-1, E), float("-inf"))
            ids = choice.topk(k, dim=-1).indices
            w = s.gather(1, ids)
            return ids, w / (w.sum(-1, keepdim=True) + 1e-20) * 2.5
        return (lambda s: cpu_decode.route(s, bias, G, tg, k, True, 2.5)), torch_route, xs
    if kernel == "index_scores":             # V3.2's indexer: 16 heads x 128 against 4096 keys
        T, H, D = 4096, 16, 128
        q, w = rand(H, D), torch.rand(H, generator=g)
        return ((lambda keys: cpu_decode.index_scores(keys, q, w)),
                (lambda keys: torch.mv(F.linear(keys, q).float().clamp_min_(0), w)),
                copies(lambda: rand(T, D), T * D * 2))
    if kernel in ("latent_attention", "latent_attention_short"):
        # one token, 16 heads, over 4096 latent rows of 576, or 1024: the engine's torch path splits
        # the rows over the threads only from 1024 rows a thread (model/attn_absorbed.py), so below
        # that its pass runs on one thread, and one verdict for both lengths was wrong for one of
        # them (Moonlight-16B at 1024 rows, 2 threads: C 15 ms a token, torch 28)
        T, H, D, c = 4096 if kernel == "latent_attention" else 1024, 16, 576, 512
        q = rand(1, 1, H, D, s=0.1)
        n = torch.get_num_threads()
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

        def torch_attn(lat):
            # the engine's torch path (model/attn_absorbed.py): one flash-attention pass with the
            # whole rows as values, the cache split into one piece per thread merged by log-sum-exp
            # when the threads have >= 1024 rows each (torch's pass runs one query block on one thread)
            if n == 1 or T < 1024 * n:
                kv = lat[None, None]
                return F.scaled_dot_product_attention(q, kv, kv, scale=0.07)[..., :c]
            kv = lat.view(n, 1, T // n, D)
            o, lse = flash(q.expand(n, 1, H, D), kv, kv, 0.0, False, scale=0.07)
            return (o[..., :c].float() * lse.softmax(dim=0)[..., None]).sum(0).to(dt)
        # the C arm with its output and scratch kept, as the fused step keeps them: a fresh ~0.3 MB
        # scratch a call is an mmap whose pages fault in each time, which made the two arms tie at
        # 1024 rows on a 2-core AVX2 EPYC where the step's C attention takes half torch's time
        out, work = torch.empty(H, c, dtype=dt), torch.empty(cpu_decode.attention_work(H, D, c, n))
        return ((lambda lat: cpu_decode.latent_attention(q[0, 0], lat, 0.07, c, out=out, work=work)), torch_attn,
                copies(lambda: rand(T, D), T * D * dt.itemsize))
    if kernel == "index_select":             # top-512 of 8192 keys' scores from [T, 64] logits
        T, H, k = 8192, 64, 512
        w = torch.rand(H, generator=g)
        xs = [rand(T, H) for _ in range(4)]

        def torch_select(logits):
            scores = torch.mv(logits.float().clamp_min_(0), w)
            return scores.topk(k).indices.sort().values
        return (lambda logits: cpu_sparse.index_select(logits, w, k)), torch_select, xs
    if kernel == "gather":                   # 2048 of 16384 latent rows of 576
        T, W, k = 16384, 576, 2048
        idx = torch.randperm(T, generator=g)[:k].sort().values
        out = torch.empty(k, W, dtype=dt)
        return ((lambda src: cpu_sparse.gather_sorted(src, idx, out)),
                (lambda src: torch.index_select(src, 0, idx, out=out)), copies(lambda: rand(T, W), T * W * 2))
    raise ValueError(kernel)


def _alternating(c_fn, t_fn, items, rounds: int) -> tuple[float, float]:
    """Median seconds per call of each arm over ``rounds`` rounds, the arms alternating."""
    for fn in (c_fn, t_fn):
        for it in items[:2]:
            fn(it)
    times = {c_fn: [], t_fn: []}
    for r in range(rounds):
        for fn in ((c_fn, t_fn) if r % 2 == 0 else (t_fn, c_fn)):
            t0 = time.perf_counter()
            for it in items:
                fn(it)
            times[fn].append((time.perf_counter() - t0) / len(items))
    return statistics.median(times[c_fn]), statistics.median(times[t_fn])
