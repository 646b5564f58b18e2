"""Block-scaled FP8 GEMM: out = a @ b.T with a's 1x128 and b's 128x128 scales, fp32 accumulation.

  a  e4m3 [M, K]   a_scale fp32 [M, K/128]            (from ``act_quant``)
  b  e4m3 [N, K]   b_scale fp32 [ceil(N/128), K/128]  (a checkpoint weight and its weight_scale_inv)
  out[m, n] = sum_j  (a[m, Kj] . b[n, Kj]) * a_scale[m, j] * b_scale[n // 128, j]

Each 128-wide K slice is one fresh ``tl.dot`` whose fp32 result is scaled and added to an fp32
accumulator: the report's fix for Hopper's ~14-bit tensor-core accumulation (promote every
N_C = 128 elements, report sec. 3.3.2). K must be a multiple of 128; M and N may be anything (edge tiles
are masked). The reference is ``dsv3lab.fp8.fp8_gemm_ref`` (fp32).

Autotuned over tile shapes on a GPU, keyed on (N, K, a bucket of M) so a decode step (M = batch)
and a prefill chunk each get their own tiles without re-tuning for every M. The interpreter
cannot run more than one autotune config (docs/references.md#triton-interpreter), so it gets
exactly one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, next_pow2
from ._jit import store_rounded

BLOCK_K = 128


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    out = []
    for bm, bn, warps, stages in [
        (16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4), (64, 128, 8, 3),
        (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3),
    ]:
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return out


@triton.autotune(configs=_configs(), key=["N", "K", "M_BUCKET"])
@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, M_BUCKET,
                     stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                     stride_asm, stride_ask, stride_bsn, stride_bsk,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    # grouped launch order: neighbouring programs share b tiles in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptrs = a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + cols[:, None] * stride_bn + ks[None, :] * stride_bk
    as_ptrs = as_ptr + rows * stride_asm
    bs_ptrs = bs_ptr + (cols // BLOCK_K) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=col_ok[:, None], other=0.0)
        sa = tl.load(as_ptrs + j * stride_ask, mask=row_ok, other=0.0)
        sb = tl.load(bs_ptrs + j * stride_bsk, mask=col_ok, other=0.0)
        part = tl.dot(a, tl.trans(b))                  # fresh fp32 sum over this 128-wide slice
        acc += part * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    mask = row_ok[:, None] & col_ok[None, :]
    store_rounded(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc, mask)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a e4m3 [M, K] (1x128 scales [M, K/128]) @ b e4m3 [N, K] (128x128 scales) .T -> [M, N]."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"fp8_gemm: a and b must be 2-D, got a {tuple(a.shape)}, b {tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if t.dtype != torch.float8_e4m3fn:
            raise TypeError(f"fp8_gemm: {name} must be float8_e4m3fn, got {t.dtype}")
    for name, t in (("a_scale", a_scale), ("b_scale", b_scale)):
        if t.dtype != torch.float32:
            raise TypeError(f"fp8_gemm: {name} must be fp32, got {t.dtype}")
    M, K = a.shape
    N, Kb = b.shape
    if K != Kb:
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)} and b {tuple(b.shape)} disagree on K")
    if K % BLOCK_K:
        raise ValueError(f"fp8_gemm: K = {K} is not a multiple of {BLOCK_K}")
    nk = K // BLOCK_K
    if tuple(a_scale.shape) != (M, nk):
        raise ValueError(f"fp8_gemm: a_scale has shape {tuple(a_scale.shape)}, expected [{M}, {nk}] "
                         f"(one scale per 1x{BLOCK_K} tile of a)")
    if tuple(b_scale.shape) != (triton.cdiv(N, BLOCK_K), nk):
        raise ValueError(f"fp8_gemm: b_scale has shape {tuple(b_scale.shape)}, expected "
                         f"[{triton.cdiv(N, BLOCK_K)}, {nk}] (one scale per {BLOCK_K}x{BLOCK_K} block of b)")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"fp8_gemm: out_dtype must be bf16/fp16/fp32, got {out_dtype}")
    check_device("fp8_gemm", a, a_scale, b, b_scale)
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    _fp8_gemm_kernel[grid](a, b, c, a_scale, b_scale, M, N, K, min(next_pow2(M), 4096),
                           a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                           a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
                           BLOCK_K=BLOCK_K, GROUP_M=8)
    return c
