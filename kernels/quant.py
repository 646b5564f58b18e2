"""FP8 (e4m3) block quantization kernels: activations in 1x128 tiles, weights in 128x128 blocks.

Semantics are those of the torch references in ``dsv3lab.fp8`` (re-exported here as ``*_ref``),
bit for bit:
  act_quant     x [..., K] -> y e4m3 [..., K], scale fp32 [..., K/128];
                scale = max(amax, 1e-4)/448 per 1x128 tile (``"ue8m0"``: rounded *up* to 2^k,
                read from the exponent bits), y = RNE(clamp(x/scale, +-448)).
  weight_quant  w [M, N] -> q e4m3 [M, N], scale_inv fp32 [ceil(M/128), ceil(N/128)];
                a partial edge block is the zero-padded block, so its amax ignores the padding.
  weight_dequant q * scale_inv per block -> bf16/fp16/fp32.
Divisions use ``div_rn`` (IEEE) rather than triton's default fast division so the GPU bytes match
torch; rounding to e4m3 is done in fp32 arithmetic (``_jit.round_to_e4m3``) so the interpreter's
wrong fp8 casts never round anything.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import FP8_MAX, check_device, interpreting
from .fp8_grid import check_scale_shape
from ._jit import pow2_ceil, round_to_e4m3, store_rounded

E4M3 = torch.float8_e4m3fn


def _check_block(name: str, block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{name}: block_size must be a power of two >= 16, got {block_size}")


# --- activations: 1 x block tiles ---------------------------------------------------------------
@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, stride_xm, stride_xk, stride_ym, stride_sm,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-4)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if UE8M0:
        scale = pow2_ceil(scale)
    y = tl.math.div_rn(x, scale[:, None])
    y = round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows * stride_sm + kb, scale, mask=rows < M)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (bf16/fp16/fp32, any strides) -> (e4m3 [..., K], fp32 scale [..., K/block_size])."""
    _check_block("act_quant", block_size)
    if scale_fmt not in (None, "ue8m0"):
        raise ValueError(f"act_quant: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"act_quant: x must be bf16/fp16/fp32, got {x.dtype}")
    K = x.shape[-1]
    if x.dim() == 0 or K % block_size:
        raise ValueError(f"act_quant: last dimension of x {tuple(x.shape)} must be a multiple of "
                         f"block_size {block_size}")
    check_device("act_quant", x)
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(M, K, dtype=E4M3, device=x.device)
    s = torch.empty(M, K // block_size, dtype=torch.float32, device=x.device)
    if M:
        BLOCK_M = 64 if interpreting() else 16
        grid = (triton.cdiv(M, BLOCK_M), K // block_size)
        _act_quant_kernel[grid](x2, y, s, M, x2.stride(0), x2.stride(1), y.stride(0), s.stride(0),
                                BLOCK_M=BLOCK_M, BLOCK_K=block_size, UE8M0=scale_fmt == "ue8m0",
                                num_warps=4)
    return y.view(x.shape), s.view(*x.shape[:-1], K // block_size)


# --- weights: block x block tiles -----------------------------------------------------------------
@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, M, N, stride_wm, stride_wn, stride_qm, stride_sm,
                         BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wm + cols[None, :] * stride_wn, mask=mask, other=0.0)
    w = w.to(tl.float32)
    amax = tl.max(tl.max(tl.abs(w), axis=1), axis=0)
    s = tl.math.div_rn(amax, 448.0)
    safe = tl.where(s > 0, s, 1.0)
    q = round_to_e4m3(tl.minimum(tl.maximum(tl.math.div_rn(w, safe), -448.0), 448.0))
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_m * stride_sm + pid_n, s)


def weight_quant(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] -> (e4m3 [M, N], scale_inv fp32 [ceil(M/b), ceil(N/b)]); dequant multiplies."""
    _check_block("weight_quant", block_size)
    if w.dim() != 2:
        raise ValueError(f"weight_quant: expects a 2-D weight, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight_quant: w must be bf16/fp16/fp32, got {w.dtype}")
    check_device("weight_quant", w)
    M, N = w.shape
    b = block_size
    q = torch.empty(M, N, dtype=E4M3, device=w.device)
    s = torch.empty(math.ceil(M / b), math.ceil(N / b), dtype=torch.float32, device=w.device)
    if q.numel():
        _weight_quant_kernel[s.shape](w, q, s, M, N, w.stride(0), w.stride(1), q.stride(0), s.stride(0),
                                      BLOCK=b, num_warps=8)
    return q, s


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, out_ptr, M, N, stride_qm, stride_qn, stride_sm, stride_sn,
                           stride_om, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn, mask=mask, other=0.0)
    s = tl.load(s_ptr + pid_m * stride_sm + pid_n * stride_sn)
    store_rounded(out_ptr + rows[:, None] * stride_om + cols[None, :], q.to(tl.float32) * s, mask)


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """e4m3 q [M, N] times its block scale_inv [ceil(M/b), ceil(N/b)] -> dtype [M, N]."""
    _check_block("weight_dequant", block_size)
    if q.dim() != 2:
        raise ValueError(f"weight_dequant: expects a 2-D weight, got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"weight_dequant: weight must be fp8 (e4m3/e5m2), got {q.dtype}")
    M, N = q.shape
    b = block_size
    check_scale_shape(M, N, scale_inv, b, who="weight_dequant: ")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"weight_dequant: scale_inv must be fp32, got {scale_inv.dtype}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"weight_dequant: output dtype must be bf16/fp16/fp32, got {dtype}")
    check_device("weight_dequant", q, scale_inv)
    out = torch.empty(M, N, dtype=dtype, device=q.device)
    if out.numel():
        _weight_dequant_kernel[tuple(scale_inv.shape)](q, scale_inv, out, M, N, q.stride(0), q.stride(1),
                                     scale_inv.stride(0), scale_inv.stride(1), out.stride(0),
                                     BLOCK=b, num_warps=8)
    return out
