"""Triton kernels on a GPU: FP8 GEMM TFLOP/s, MLA decode GB/s, MoE token grouping time.

Peers are measured in the same run on the same device:
  fp8_gemm       vs torch bf16 matmul (cuBLAS) and torch._scaled_mm -- with 1x128/128x128 block
                 scales where this torch accepts them (tried, checked against the reference),
                 and row-wise scales (the plain cuBLAS FP8 path) -- on the DeepGEMM shapes
                 (docs/references.md#deepgemm: six N x K pairs, M = 64, 128, 4096);
                 "peak" is the device's dense FP8 figure when the name is known (H100/H200/H800: 1979 TFLOP/s)
  mla_decode     GB/s over the latent cache (B*T*576 bf16 values per step) vs a device copy's
                 bandwidth (read + write of 1 GiB), and vs the torch absorbed path
  group_tokens   vs torch bincount + stable argsort; grouped_gemm vs a per-expert matmul loop
Without CUDA it stops with an error, unless ``--interpret`` asks for a tiny smoke run under
TRITON_INTERPRET=1 (checks that everything runs; its times mean nothing).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from dsv3lab.bench import print_table, write_json_atomic
from dsv3lab.bench.record import recorded

GEMM_SHAPES = [(2112, 7168, "q_a+kv_a"), (24576, 1536, "q_b"), (32768, 512, "kv_b"),
               (7168, 16384, "o_proj"), (4096, 7168, "gate+up"), (7168, 2048, "down")]
FP8_PEAK = {"H100": 1979.0, "H200": 1979.0, "H800": 1979.0, "H20": 296.0}


def add_args(p) -> None:
    p.add_argument("--interpret", action="store_true", help="tiny CPU smoke run under TRITON_INTERPRET=1")
    p.add_argument("--m", default="64,128,4096", help="GEMM M values")
    p.add_argument("--contexts", default="1024,4096,8192,16384,32768", help="MLA decode context lengths")
    p.add_argument("--batches", default="1,16", help="MLA decode batch sizes")
    p.add_argument("--tokens", default="128,4096", help="tokens for the grouping / grouped GEMM rows")
    p.add_argument("--skip", default="", help="comma list of sections to skip: gemm,mla,moe")


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _timer(interpret: bool):
    if interpret:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return bench
    from triton.testing import do_bench
    return lambda fn: do_bench(fn, warmup=25, rep=100)


def _scaled_mm_block(a, sa, b, sb, ref):
    """torch._scaled_mm with block scales, if this torch/cuBLAS accepts some layout of them."""
    if not hasattr(torch, "_scaled_mm"):
        return None, "no torch._scaled_mm"
    cands = {"sa,sb": (sa, sb), "sa(M-major),sb": (sa.t().contiguous().t(), sb),
             "sa(M-major),sb.T": (sa.t().contiguous().t(), sb.t()), "sa,sb.T": (sa, sb.t()),
             "sa(M-major),sb.T(contig)": (sa.t().contiguous().t(), sb.t().contiguous())}
    last = ""
    for name, (x, y) in cands.items():
        try:
            out = torch._scaled_mm(a, b.t(), scale_a=x, scale_b=y, out_dtype=torch.bfloat16)
            err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            if err < 2e-2:
                return (lambda: torch._scaled_mm(a, b.t(), scale_a=x, scale_b=y, out_dtype=torch.bfloat16)), name
            last = f"{name}: wrong result (rel err {err:.2g})"
        except Exception as e:                     # noqa: BLE001 -- any refusal means "unsupported"
            last = f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None, "unsupported (" + last + ")"


def bench_gemm(dev, bench, Ms, interpret):
    from dsv3lab.fp8 import act_quant as act_quant_ref, fp8_gemm_ref, weight_quant as weight_quant_ref
    from dsv3lab.kernels import act_quant, fp8_gemm
    shapes = [(256, 256, "smoke")] if interpret else GEMM_SHAPES
    Ms = [64] if interpret else Ms
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in FP8_PEAK.items() if k in name), None)
    rows = []
    for N, K, layer in shapes:
        w = torch.randn(N, K, device=dev)
        b, sb = weight_quant_ref(w)
        w16 = w.to(torch.bfloat16)
        for M in Ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            a, sa = act_quant(x)
            flop = 2.0 * M * N * K
            row = dict(layer=layer, M=M, N=N, K=K)
            t = bench(lambda: fp8_gemm(a, sa, b, sb))
            row["fp8_gemm_tflops"] = flop / t / 1e9
            row["bf16_tflops"] = flop / bench(lambda: x @ w16.t()) / 1e9
            t_q = bench(lambda: act_quant(x))
            row["act_quant_us"] = t_q * 1e3
            row["vs_bf16"] = row["fp8_gemm_tflops"] / row["bf16_tflops"]
            if peak:
                row["of_fp8_peak"] = row["fp8_gemm_tflops"] / peak
            if dev.type == "cuda":
                ref = fp8_gemm_ref(a, sa, b, sb)
                fn, how = _scaled_mm_block(a, sa, b, sb, ref)
                row["scaled_mm_block_tflops"] = flop / bench(fn) / 1e9 if fn else None
                row["scaled_mm_block"] = how
                try:
                    ar, sar = act_quant_ref(x, block_size=K)          # one scale per row
                    br, sbr = b, sb.amax().reshape(1, 1).expand(1, N).contiguous()
                    fn = lambda: torch._scaled_mm(ar, br.t(), scale_a=sar, scale_b=sbr, out_dtype=torch.bfloat16)  # noqa: E731
                    fn()
                    row["scaled_mm_rowwise_tflops"] = flop / bench(fn) / 1e9
                except Exception as e:                 # noqa: BLE001
                    row["scaled_mm_rowwise_tflops"] = None
                    row["scaled_mm_rowwise"] = f"unsupported: {type(e).__name__}"
            rows.append(row)
    return rows


def bench_mla(dev, bench, contexts, batches, interpret):
    from dsv3lab.kernels import mla_decode
    H, C, R = (16, 64, 16) if interpret else (128, 512, 64)
    contexts = [256] if interpret else contexts
    batches = [1] if interpret else batches
    dtype = torch.float32 if interpret else torch.bfloat16
    rows = []
    for B in batches:
        for T in contexts:
            q = torch.randn(B, H, C + R, device=dev, dtype=dtype)
            cache = torch.randn(B, T, C + R, device=dev, dtype=dtype)
            nbytes = cache.numel() * cache.element_size() + 2 * q.numel() * q.element_size()
            t = bench(lambda: mla_decode(q, cache, 0.1352338, C))

            def torch_path():
                s = torch.bmm(q, cache.transpose(1, 2)).float() * 0.1352338
                return torch.bmm(s.softmax(-1).to(dtype), cache[..., :C])
            t_ref = bench(torch_path)
            rows.append(dict(B=B, H=H, T=T, cache_MB=nbytes / 1e6, mla_decode_us=t * 1e3,
                             mla_GBps=nbytes / t / 1e6, torch_us=t_ref * 1e3, speedup=t_ref / t))
    return rows


def copy_bandwidth(dev, bench, interpret):
    n = (16 << 20) if interpret else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * n / bench(lambda: dst.copy_(src)) / 1e6     # GB/s: read + write


def bench_moe(dev, bench, tokens, interpret):
    from dsv3lab.kernels import group_tokens, grouped_gemm
    E, k, D, N = (16, 4, 128, 128) if interpret else (32, 8, 7168, 4096)
    tokens = [64] if interpret else tokens
    dtype = torch.float32 if interpret else torch.bfloat16
    rows = []
    w = torch.randn(E, N, D, device=dev, dtype=dtype) * 0.02
    for T in tokens:
        # 256 experts routed, this GPU owns E of them: keep the pairs that land here
        ids = torch.stack([torch.randperm(8 * E if not interpret else E)[:k] for _ in range(T)]).to(dev)
        ids = ids % E
        x = torch.randn(T, D, device=dev, dtype=dtype)

        def torch_group():
            flat = ids.reshape(-1)
            return torch.bincount(flat, minlength=E), flat.argsort(stable=True)
        row = dict(tokens=T, top_k=k, experts=E)
        row["group_tokens_us"] = bench(lambda: group_tokens(ids, E, 1)) * 1e3
        row["torch_argsort_us"] = bench(torch_group) * 1e3
        g = group_tokens(ids, E, 64)
        row["grouped_gemm_us"] = bench(lambda: grouped_gemm(x, g, w)) * 1e3
        counts = g.counts.tolist()
        order = ids.reshape(-1).argsort(stable=True) // k

        def loop():
            xs = x[order]
            lo, outs = 0, []
            for e, n in enumerate(counts):
                if n:
                    outs.append(xs[lo:lo + n] @ w[e].t())
                lo += n
            return torch.cat(outs)
        row["expert_loop_us"] = bench(loop) * 1e3
        row["grouped_speedup"] = row["expert_loop_us"] / row["grouped_gemm_us"]
        rows.append(row)
    return rows


def run(args) -> int:
    interpret = bool(args.interpret)
    if interpret:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError("--interpret: triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ["TRITON_INTERPRET"] = "1"
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("dsv3lab bench kernels: needs a CUDA GPU (none found). For a tiny CPU smoke run "
              "under the Triton interpreter, pass --interpret (its times are not performance).",
              file=sys.stderr)
        return 2
    else:
        os.environ["TRITON_INTERPRET"] = "0"
        dev = torch.device("cuda")
    import triton
    bench = _timer(interpret)
    skip = set(args.skip.split(","))
    result = dict(mode="interpret" if interpret else "gpu",
                  device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
                  torch=torch.__version__, triton=triton.__version__)
    if "gemm" not in skip:
        print("== fp8_gemm (TFLOP/s) ==")
        result["gemm"] = bench_gemm(dev, bench, _ints(args.m), interpret)
        print_table(result["gemm"], ["layer", "M", "N", "K", "fp8_gemm_tflops", "bf16_tflops", "vs_bf16"]
                    + (["scaled_mm_block_tflops", "scaled_mm_rowwise_tflops", "of_fp8_peak"] if not interpret else []))
        if not interpret:
            notes = {r["scaled_mm_block"] for r in result["gemm"]}
            print("torch._scaled_mm block scales:", "; ".join(sorted(notes)))
    if "mla" not in skip:
        print("\n== absorbed-MLA decode ==")
        copy = copy_bandwidth(dev, bench, interpret)
        result["copy_GBps"] = copy
        rows = bench_mla(dev, bench, _ints(args.contexts), _ints(args.batches), interpret)
        for r in rows:
            r["of_copy_bw"] = r["mla_GBps"] / copy
        result["mla"] = rows
        print(f"device copy bandwidth: {copy:,.0f} GB/s")
        print_table(rows, ["B", "H", "T", "cache_MB", "mla_decode_us", "mla_GBps", "of_copy_bw", "torch_us", "speedup"])
    if "moe" not in skip:
        print("\n== MoE token grouping / grouped GEMM ==")
        result["moe"] = bench_moe(dev, bench, _ints(args.tokens), interpret)
        print_table(result["moe"])
    if interpret:
        print("\n(interpreter smoke run: the kernels ran; the times are not performance numbers)")
    path = write_json_atomic(args.out or os.path.join("results", "bench-kernels.json"), recorded(result))
    print(f"\nwrote {path}")
    return 0
