"""The V3.2 indexer's decode kernels (``cpu/sparse_bf16.c``): built on first use, called through ctypes.

  index_qkw(x, q_latent, ...)    one token's indexer query (projection, RoPE), key (projection,
                                 LayerNorm, RoPE) and head weights: one call for what
                                 ``Indexer.project`` does in about twenty torch ops
  index_topk(keys, q, w, k)      the indexer's scores straight from the key cache by AMX tiles
                                 (where the CPU has them) and their top-k, as index_select
  index_select(logits, w, k)     the relu'd, head-weighted scores of the bf16 q.k products and
                                 their top-k positions (exact, ``select_topk``'s tie rule), in
                                 increasing position order: one call for a GEMV, a top-k and a tie check
  gather_sorted(src, idx, out)   out[i] = src[idx[i]] with every line of the rows ahead prefetched

These functions check their arguments and name what does not fit; the decode fast path
(``dsv3lab/fast/sparse.py``: ``select_fused``, ``gathered``) checks its layout once per
set of weights and calls ``library()`` directly. Built and gated like the other CPU kernels
(``cpu_compile.compile_library``, ``cpu_decode.enabled``): ``library()`` is None without a compiler or when the build
fails, and callers then run their torch code.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_compile, cpu_decode

SOURCE = cpu_compile.SOURCES / "sparse_bf16.c"
MAX_DIM = 1024            # index_head_dim one index_qkw call takes (its fp32 row buffer)


def library() -> ctypes.CDLL | None:
    """The sparse library (``cpu/sparse_bf16.c``) for the current tier, signatures set, or None."""
    return _library(cpu_compile.march())


@functools.lru_cache(maxsize=None)
def _library(tier: str) -> ctypes.CDLL | None:
    P, I64, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    return cpu_compile.bound_library(SOURCE, tier, {
        "dsv3_index_qkw": [P, I, P, I, P, P, P, P, F, P, P, P, F, I, I, I, P, P, P, P, I],
        "dsv3_index_select": ([P, I64, I, I, P, I, P, P, P, P], I),
        "dsv3_topk_scores": ([P, I, I, P, P, P], I),
        "dsv3_index_topk": ([P, I64, I, P, I, I, P, I, P, P, P, P, I], I),
        "dsv3_amx_available": ([], I),
        "dsv3_gather_sorted": [P, I64, P, I, I, P, I],
        "dsv3_index_decode": ([P, P], I),
        "dsv3_gather_packed": [P],
    })


def enabled(*tensors: torch.Tensor) -> bool:
    """The CPU kernels' gate (bf16 CPU tensors, no autograd, backend 'auto') and this library built."""
    return cpu_decode.enabled(*tensors) and library() is not None


def _fits(fn: str, name: str, t: torch.Tensor, n: int, dtype) -> None:
    if t.dtype != dtype or t.numel() != n or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{fn}: {name} must be {n} contiguous {dtype} values on the CPU, got "
                         f"{tuple(t.shape)} {t.dtype}{'' if t.is_contiguous() else ' (strided)'} on {t.device}")


def index_qkw(x: torch.Tensor, q_latent: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, ln_w: torch.Tensor,
              ln_b: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor, wp: torch.Tensor, wscale: float,
              n_heads: int, r: int, k_out: torch.Tensor | None = None):
    """One token (x [hidden], q_latent [q_lora_rank] bf16) -> q [H,D] bf16 = rope(bf16(wq q_latent)),
    k [D] bf16 = rope(bf16(LayerNorm(bf16(wk x)))), w [H] fp32 = (wp x) * wscale, RoPE half-split on
    the first r dims by cos/sin [r/2] fp32. ``k_out`` (e.g. a row of the key cache) receives k."""
    H = n_heads
    D, hidden = wk.shape
    qlr = q_latent.numel()
    if not (0 < D <= MAX_DIM and r % 2 == 0 and r <= D):
        raise ValueError(f"index_qkw: head dim {D} (at most {MAX_DIM}) and rope dim {r} (even, <= D) do not fit")
    bf, f32 = torch.bfloat16, torch.float32
    q, w = torch.empty(H, D, dtype=bf), torch.empty(H, dtype=f32)
    k = torch.empty(D, dtype=bf) if k_out is None else k_out
    for name, t, n, dt in (("x", x, hidden, bf), ("q_latent", q_latent, qlr, bf), ("wq", wq, H * D * qlr, bf),
                           ("wk", wk, D * hidden, bf), ("ln_w", ln_w, D, bf), ("ln_b", ln_b, D, bf),
                           ("cos", cos, r // 2, f32), ("sin", sin, r // 2, f32), ("wp", wp, H * hidden, f32),
                           ("k_out", k, D, bf)):
        _fits("index_qkw", name, t, n, dt)
    scratch = torch.empty(H * D + D, dtype=bf)
    library().dsv3_index_qkw(x.data_ptr(), hidden, q_latent.data_ptr(), qlr, wq.data_ptr(), wk.data_ptr(),
                             ln_w.data_ptr(), ln_b.data_ptr(), float(eps), cos.data_ptr(), sin.data_ptr(),
                             wp.data_ptr(), float(wscale), H, D, r, scratch.data_ptr(), q.data_ptr(), k.data_ptr(),
                             w.data_ptr(), torch.get_num_threads())
    return q, k, w


def index_select(logits: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor | None:
    """logits [T,H] bf16 (unit stride along H; rows may be a strided view), w [H] fp32, 1 <= k < T ->
    the k positions of the largest sum_h w[h] relu(logits[t,h]) [k] int64, in increasing order,
    ties at the k-th score broken towards earlier positions; None if a score is NaN."""
    T, H = logits.shape
    if logits.dtype != torch.bfloat16 or logits.stride(-1) != 1 or logits.device.type != "cpu":
        raise ValueError(f"index_select: logits must be [T,H] bf16 on the CPU with unit stride along H, got "
                         f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}")
    _fits("index_select", "w", w, H, torch.float32)
    if not 1 <= k < T:
        raise ValueError(f"index_select: k = {k} must be in [1, T = {T})")
    work = torch.empty(3, T, dtype=torch.int32)          # scores (fp32), their order keys, candidates
    idx = torch.empty(k, dtype=torch.int64)
    n = library().dsv3_index_select(logits.data_ptr(), logits.stride(0), T, H, w.data_ptr(), k,
                                    work[0].data_ptr(), work[1].data_ptr(), work[2].data_ptr(), idx.data_ptr())
    return None if n < 0 else idx


def amx_available() -> bool:
    """Whether ``index_topk`` can run here (the library built with AMX, the kernel granting it)."""
    lib = library()
    return lib is not None and bool(lib.dsv3_amx_available())


def index_topk(keys: torch.Tensor, q: torch.Tensor, w: torch.Tensor, k: int, scores: torch.Tensor | None = None):
    """keys [T,D] bf16 (unit stride along D), q [H,D] bf16, w [H] fp32, 1 <= k < T -> the k positions of
    the largest sum_h w[h] relu(bf16(q[h] . keys[t])) [k] int64, as ``index_select`` (None if a score
    is NaN); ``scores`` [T] fp32, if given, receives the scores. Needs ``amx_available()``, D a multiple
    of 32 up to 512 and H <= 64."""
    T, D = keys.shape
    H = q.shape[0]
    if keys.dtype != torch.bfloat16 or keys.stride(-1) != 1 or keys.device.type != "cpu":
        raise ValueError(f"index_topk: keys must be [T,D] bf16 on the CPU with unit stride along D, got "
                         f"{tuple(keys.shape)} {keys.dtype} strides {keys.stride()}")
    _fits("index_topk", "q", q, H * D, torch.bfloat16)
    _fits("index_topk", "w", w, H, torch.float32)
    if not 1 <= k < T:
        raise ValueError(f"index_topk: k = {k} must be in [1, T = {T})")
    if not amx_available() or D % 32 or D > 512 or H > 64:
        raise ValueError(f"index_topk: needs AMX (available: {amx_available()}), D % 32 == 0 and D <= 512 "
                         f"(D = {D}), H <= 64 (H = {H})")
    work = torch.empty(3, T, dtype=torch.int32)
    idx = torch.empty(k, dtype=torch.int64)
    n = library().dsv3_index_topk(keys.data_ptr(), keys.stride(0), T, q.data_ptr(), H, D, w.data_ptr(), k,
                                  work[0].data_ptr(), work[1].data_ptr(), work[2].data_ptr(), idx.data_ptr(),
                                  torch.get_num_threads())
    if scores is not None:
        scores.copy_(work[0].view(torch.float32))
    return None if n < 0 else idx


def gather_sorted(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = src[idx[i]]: src [T, W] bf16 (unit stride along W), idx [k] int64 in [0, T),
    out [k, W] contiguous bf16."""
    k, W = idx.numel(), src.shape[1]
    if (src.stride(-1) != 1 or src.dtype != torch.bfloat16 or tuple(out.shape) != (k, W) or not out.is_contiguous()
            or out.dtype != src.dtype or idx.dtype != torch.int64 or not idx.is_contiguous()):
        raise ValueError(f"gather_sorted: src {tuple(src.shape)} {src.dtype}, idx {tuple(idx.shape)} {idx.dtype}, "
                         f"out {tuple(out.shape)} {out.dtype} do not fit")
    if k and (int(idx.min()) < 0 or int(idx.max()) >= src.shape[0]):
        raise ValueError(f"gather_sorted: an index is outside [0, {src.shape[0]})")
    library().dsv3_gather_sorted(src.data_ptr(), src.stride(0), idx.data_ptr(), k, W, out.data_ptr(),
                                 torch.get_num_threads())
    return out
