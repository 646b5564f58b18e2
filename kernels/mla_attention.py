"""Absorbed-MLA decode attention over the latent cache: B sequences x H heads x one new token.

  q      [B, H, c + r]   the new token's query, already in latent space: [q_nope W_UK ; q_pe]
  cache  [B, T, c + r]   row t = [c_kv,t ; k_pe,t] (keys), and its first c columns are the values
  o      [B, H, c]       o_h = sum_t softmax_t(q_h . cache_t * scale) cache_t[:c]
The caller applies W_UV and o_proj (``dsv3lab.model.attn_absorbed``). For V3 c + r = 512 + 64 = 576: one cache
row is read once for all heads of a block, so decode is bound by reading B*T*576 values.

Flash-decoding: the context is cut into ``num_splits`` pieces so that even B = 1 fills the GPU;
each (sequence, head block, piece) program runs an online softmax (in base 2) over 64-row tiles
and writes a normalized partial output with its log-sum-exp; a second small kernel merges the
pieces. With one piece the first kernel writes the result directly. ``seqlens`` [B] lets each
sequence attend to its own prefix of the cache.

Dots run in the cache dtype with fp32 accumulation on a GPU (bf16 like FlashMLA); under the
interpreter everything is upcast to fp32 (its bf16 arithmetic is wrong,
docs/references.md#triton-interpreter). fp32 inputs use full-precision (not TF32) dots.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting, next_pow2
from ._jit import store_rounded

LOG2E = 1.4426950408889634


def mla_decode_ref(q: torch.Tensor, cache: torch.Tensor, scale: float, kv_lora_rank: int,
                   seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 reference: softmax(q . cache^T * scale) @ cache[..., :c] -> [B, H, c]."""
    scores = torch.einsum("bhd,btd->bht", q.float(), cache.float()) * scale
    if seqlens is not None:
        T = cache.shape[1]
        keep = torch.arange(T, device=cache.device)[None, :] < seqlens.to(cache.device)[:, None]
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.einsum("bht,btc->bhc", scores.softmax(-1), cache[..., :kv_lora_rank].float())


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_H": 16, "BLOCK_T": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_H": bh, "BLOCK_T": bt}, num_warps=w, num_stages=s)
            for bh, bt, w, s in [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 3),
                                 (16, 64, 4, 2), (64, 16, 4, 3), (16, 32, 4, 3)]]


@triton.autotune(configs=_configs(), key=["H", "C", "R", "CHUNK_BUCKET"])
@triton.jit
def _mla_decode_kernel(q_ptr, kv_ptr, lens_ptr, o_ptr, po_ptr, lse_ptr, T, H, C, R, chunk, CHUNK_BUCKET,
                       qk_scale, stride_qb, stride_qh, stride_kb, stride_kt, stride_ob, stride_oh,
                       stride_pb, stride_ps, stride_ph,
                       BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_R: tl.constexpr, HAS_LENS: tl.constexpr, SPLIT: tl.constexpr,
                       UPCAST: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0)
    pid_h = tl.program_id(1)
    s = tl.program_id(2)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    cs = tl.arange(0, BLOCK_C)
    rs = tl.arange(0, BLOCK_R)
    c_ok = cs < C
    r_ok = rs < R
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_c = tl.load(q_row + cs[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    q_r = tl.load(q_row + C + rs[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    if UPCAST:
        q_c = q_c.to(tl.float32)
        q_r = q_r.to(tl.float32)
    seqlen = T
    if HAS_LENS:
        seqlen = tl.minimum(tl.load(lens_ptr + b), T)
    t_lo = s * chunk
    t_hi = tl.minimum(t_lo + chunk, seqlen)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    kv_row = kv_ptr + b * stride_kb
    for t0 in range(t_lo, t_hi, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < t_hi
        k_c = tl.load(kv_row + ts[:, None] * stride_kt + cs[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        k_r = tl.load(kv_row + ts[:, None] * stride_kt + C + rs[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            k_c = k_c.to(tl.float32)
            k_r = k_r.to(tl.float32)
        sc = tl.dot(q_c, tl.trans(k_c), input_precision=PREC) + tl.dot(q_r, tl.trans(k_r), input_precision=PREC)
        sc = tl.where(t_ok[None, :], sc * qk_scale, float("-inf"))      # log2 domain
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    mask = h_ok[:, None] & c_ok[None, :]
    if SPLIT:
        tl.store(po_ptr + b * stride_pb + s * stride_ps + heads[:, None] * stride_ph + cs[None, :], o, mask=mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + (b * tl.num_programs(2) + s) * H + heads, lse, mask=h_ok)
    else:
        store_rounded(o_ptr + b * stride_ob + heads[:, None] * stride_oh + cs[None, :], o, mask)


@triton.jit
def _merge_kernel(po_ptr, lse_ptr, o_ptr, H, C, n_split, stride_pb, stride_ps, stride_ph,
                  stride_ob, stride_oh, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    cs = tl.arange(0, BLOCK_C)
    s_ok = ss < n_split
    lse = tl.load(lse_ptr + (b * n_split + ss) * H + h, mask=s_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
    w = w / tl.sum(w, axis=0)
    parts = tl.load(po_ptr + b * stride_pb + ss[:, None] * stride_ps + h * stride_ph + cs[None, :],
                    mask=s_ok[:, None] & (w > 0)[:, None] & (cs < C)[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], axis=0)
    store_rounded(o_ptr + b * stride_ob + h * stride_oh + cs, o, cs < C)


def _default_splits(device, B: int, H: int, T: int) -> int:
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = B * triton.cdiv(H, 64)
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(T, 256), 64))


def mla_decode(q: torch.Tensor, cache: torch.Tensor, scale: float, kv_lora_rank: int,
               seqlens: torch.Tensor | None = None, num_splits: int | None = None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """q [B, H, c+r], cache [B, T, c+r] (last dim contiguous) -> o [B, H, c] (see module doc)."""
    if q.dim() != 3 or cache.dim() != 3:
        raise ValueError(f"mla_decode: q must be [B, H, c+r] and cache [B, T, c+r]; got q "
                         f"{tuple(q.shape)}, cache {tuple(cache.shape)}")
    B, H, W = q.shape
    T = cache.shape[1]
    C = int(kv_lora_rank)
    if cache.shape[0] != B or cache.shape[2] != W:
        raise ValueError(f"mla_decode: cache {tuple(cache.shape)} does not match q {tuple(q.shape)} "
                         f"(need [B={B}, T, {W}])")
    if not 0 < C < W:
        raise ValueError(f"mla_decode: kv_lora_rank {C} must lie in (0, {W})")
    if q.dtype != cache.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"mla_decode: q and cache need one dtype of bf16/fp16/fp32; got {q.dtype}, {cache.dtype}")
    if q.stride(2) != 1 or cache.stride(2) != 1:
        raise ValueError("mla_decode: q and cache need a contiguous last dimension")
    if seqlens is not None and (seqlens.shape != (B,) or seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"mla_decode: seqlens must be int [{B}], got {seqlens.dtype} {tuple(seqlens.shape)}")
    check_device("mla_decode", q, cache)
    R = W - C
    out_dtype = out_dtype or q.dtype
    o = torch.empty(B, H, C, dtype=out_dtype, device=q.device)
    if B == 0 or H == 0:
        return o
    if T == 0:
        raise ValueError("mla_decode: empty cache (T = 0)")
    n_split = num_splits or _default_splits(q.device, B, H, T)
    n_split = max(1, min(int(n_split), T))
    chunk = triton.cdiv(triton.cdiv(T, n_split), 64) * 64
    n_split = triton.cdiv(T, chunk)
    split = n_split > 1
    if split:
        po = torch.empty(B, n_split, H, C, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, n_split, H, dtype=torch.float32, device=q.device)
    else:
        po = lse = o                                   # unused
    lens = seqlens.to(torch.int32) if seqlens is not None else q   # q: an unused placeholder

    def grid(meta):
        return (B, triton.cdiv(H, meta["BLOCK_H"]), n_split)

    _mla_decode_kernel[grid](q, cache, lens, o, po, lse, T, H, C, R, chunk, next_pow2(chunk),
                             float(scale) * LOG2E, q.stride(0), q.stride(1), cache.stride(0), cache.stride(1),
                             o.stride(0), o.stride(1), po.stride(0) if split else 0,
                             po.stride(1) if split else 0, po.stride(2) if split else 0,
                             BLOCK_C=max(16, next_pow2(C)), BLOCK_R=max(16, next_pow2(R)),
                             HAS_LENS=seqlens is not None, SPLIT=split,
                             UPCAST=interpreting() or q.dtype == torch.float32,
                             PREC="ieee" if q.dtype == torch.float32 else "tf32")
    if split:
        _merge_kernel[(B, H)](po, lse, o, H, C, n_split, po.stride(0), po.stride(1), po.stride(2),
                              o.stride(0), o.stride(1), BLOCK_S=max(2, next_pow2(n_split)),
                              BLOCK_C=max(16, next_pow2(C)), num_warps=4)
    return o
