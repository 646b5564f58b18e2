"""MoE token grouping (a stable counting sort of (token, expert) pairs) and a grouped expert GEMM.

From ``topk_ids`` [T, k] (pair p = t*k + j routes token t to expert topk_ids[t, j]):
  counts       [E]      pairs per expert
  offsets      [E+1]    start of each expert's segment in the grouped order; with ``block`` > 1
                        every segment is padded up to a multiple of ``block`` rows
  sorted_pairs [P]      the pair sitting at each grouped slot (-1 on padding rows)
  pair_slot    [T*k]    the inverse: the slot of each pair
Within one expert the pairs keep their original order, so the unpadded permutation equals
``topk_ids.flatten().argsort(stable=True)`` -- the order ``MoE.dispatch`` uses.

Two small kernels make it: per chunk of 128 pairs, a histogram over experts (atomics); then, for
each pair, its slot = offsets[e] + (pairs of e in earlier chunks: a torch cumsum over the chunk
histograms) + (pairs of e earlier in its own chunk: a 128x128 comparison). No sort, no
per-expert loop. With padding the total size needs one device->host read.

``grouped_gemm`` then runs every expert's GEMM in one launch over the grouped rows: each
``block``-row tile belongs to one expert (that is what the padding buys), the tokens are
gathered by index inside the kernel, and the weight is the stacked [E, N, D] expert matrix.
Whether it beats a loop of per-expert cuBLAS calls is a GPU measurement (``dsv3lab bench
kernels``); on CPU it is tested under the interpreter in fp32 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_device, interpreting
from ._jit import store_rounded

CHUNK = 128


@dataclass
class TokenGroups:
    counts: torch.Tensor        # [E] int32
    offsets: torch.Tensor       # [E+1] int32, padded segment starts
    sorted_pairs: torch.Tensor  # [P] int32, -1 on padding rows
    pair_slot: torch.Tensor     # [T*k] int32
    top_k: int
    block: int

    @property
    def num_slots(self) -> int:
        return self.sorted_pairs.numel()

    @property
    def token_of_slot(self) -> torch.Tensor:
        """[P] token index of each grouped row, -1 on padding."""
        return torch.where(self.sorted_pairs >= 0, self.sorted_pairs // self.top_k, -1)

    def tile_expert(self, block_m: int | None = None) -> torch.Tensor:
        """[P/block_m] int32: the expert owning each block_m-row tile (block_m must divide block)."""
        bm = block_m or self.block
        if self.block % bm:
            raise ValueError(f"tile_expert: block_m {bm} must divide the grouping block {self.block}")
        starts = torch.arange(0, self.num_slots, bm, device=self.offsets.device, dtype=torch.int32)
        return (torch.searchsorted(self.offsets[1:].contiguous(), starts, right=True)).to(torch.int32)


def group_tokens_ref(topk_ids: torch.Tensor, num_experts: int, block: int = 1) -> TokenGroups:
    """Torch reference: bincount + stable argsort, padded segments filled with -1."""
    T, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts).to(torch.int32)
    padded = (counts + block - 1) // block * block
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = padded.cumsum(0)
    order = flat.argsort(stable=True)
    rank = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[flat[order]]
    slots = offsets[flat[order]] + rank
    P = int(offsets[-1])
    sorted_pairs = torch.full((P,), -1, dtype=torch.int32, device=flat.device)
    sorted_pairs[slots] = order.to(torch.int32)
    pair_slot = torch.empty_like(flat, dtype=torch.int32)
    pair_slot[order] = slots.to(torch.int32)
    return TokenGroups(counts, offsets, sorted_pairs, pair_slot, k, block)


@triton.jit
def _chunk_histogram_kernel(ids_ptr, hist_ptr, n_pairs, E, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    p = c * CHUNK + tl.arange(0, CHUNK)
    ok = p < n_pairs
    e = tl.load(ids_ptr + p, mask=ok, other=0)
    tl.atomic_add(hist_ptr + c * E + e, tl.full((CHUNK,), 1, tl.int32), mask=ok)


@triton.jit
def _place_pairs_kernel(ids_ptr, base_ptr, sorted_ptr, slot_ptr, n_pairs, E, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    i = tl.arange(0, CHUNK)
    p = c * CHUNK + i
    ok = p < n_pairs
    e = tl.load(ids_ptr + p, mask=ok, other=-1)
    # rank among the earlier pairs of the same expert inside this chunk (stable)
    same = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(base_ptr + c * E + e, mask=ok, other=0)   # offsets[e] + earlier chunks
    slot = base + rank
    tl.store(sorted_ptr + slot, p.to(tl.int32), mask=ok)
    tl.store(slot_ptr + p, slot, mask=ok)


def group_tokens(topk_ids: torch.Tensor, num_experts: int, block: int = 1) -> TokenGroups:
    """topk_ids [T, k] (int32/int64, values in [0, num_experts)) -> TokenGroups (see module doc)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"group_tokens: topk_ids must be [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_tokens: topk_ids must be int32/int64, got {topk_ids.dtype}")
    if block < 1:
        raise ValueError(f"group_tokens: block must be >= 1, got {block}")
    check_device("group_tokens", topk_ids)
    T, k = topk_ids.shape
    E = int(num_experts)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).contiguous()
    n = ids.numel()
    n_chunks = triton.cdiv(n, CHUNK)
    hist = torch.zeros(max(n_chunks, 1), E, dtype=torch.int32, device=dev)
    if n:
        _chunk_histogram_kernel[(n_chunks,)](ids, hist, n, E, CHUNK=CHUNK, num_warps=4)
    counts = hist.sum(0, dtype=torch.int32)
    padded = (counts + block - 1) // block * block
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offsets[1:] = padded.cumsum(0)
    base = (offsets[:-1][None, :] + hist.cumsum(0, dtype=torch.int32) - hist).contiguous()
    P = n if block == 1 else int(offsets[-1])
    sorted_pairs = torch.full((P,), -1, dtype=torch.int32, device=dev)
    pair_slot = torch.empty(n, dtype=torch.int32, device=dev)
    if n:
        _place_pairs_kernel[(n_chunks,)](ids, base, sorted_pairs, pair_slot, n, E, CHUNK=CHUNK, num_warps=4)
    return TokenGroups(counts, offsets, sorted_pairs, pair_slot, k, block)


# --- grouped expert GEMM ------------------------------------------------------------------------
@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, y_ptr, rows_ptr, tile_expert_ptr, P, N, D,
                         stride_xm, stride_xd, stride_we, stride_wn, stride_wd, stride_ym, stride_yn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = tl.arange(0, BLOCK_D)
    src = tl.load(rows_ptr + slots, mask=slots < P, other=-1)       # row of x, -1 on padding
    row_ok = src >= 0
    col_ok = cols < N
    x_ptrs = x_ptr + tl.maximum(src, 0)[:, None] * stride_xm + ds[None, :] * stride_xd
    w_ptrs = w_ptr + expert * stride_we + cols[:, None] * stride_wn + ds[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + ds) < D
        x = tl.load(x_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:      # the interpreter's bf16 arithmetic is wrong (docs/references.md#triton-interpreter)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        x_ptrs += BLOCK_D * stride_xd
        w_ptrs += BLOCK_D * stride_wd
    mask = (slots < P)[:, None] & col_ok[None, :]
    store_rounded(y_ptr + slots[:, None] * stride_ym + cols[None, :] * stride_yn, acc, mask)


def grouped_gemm_ref(x: torch.Tensor, groups: TokenGroups, w: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """y [P, N]: row s = x[token_of_slot[s]] @ w[expert of s].T (zeros on padding), in fp32."""
    rows = _source_rows(groups, gather)
    y = torch.zeros(groups.num_slots, w.shape[1], dtype=torch.float32, device=x.device)
    off = groups.offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = off[e], off[e] + int(groups.counts[e])
        if hi > lo:
            y[lo:hi] = x[rows[lo:hi]].float() @ w[e].float().T
    return y


def _source_rows(groups: TokenGroups, gather: bool) -> torch.Tensor:
    """[P] int32: the row of x feeding each grouped slot, -1 on padding."""
    if gather:
        return groups.token_of_slot.to(torch.int32)
    ar = torch.arange(groups.num_slots, device=groups.sorted_pairs.device, dtype=torch.int32)
    return torch.where(groups.sorted_pairs >= 0, ar, -1)


def grouped_gemm(x: torch.Tensor, groups: TokenGroups, w: torch.Tensor, gather: bool = True,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every expert's x @ w[e].T in one launch.

    x  [T, D] tokens in their own order (``gather=True``: rows are picked through the grouping)
       or [P, D] rows already in grouped order (``gather=False``, e.g. the output of the up-proj)
    w  [E, N, D] stacked expert weights (bf16/fp16/fp32);  groups from ``group_tokens(..., block)``
    -> y [P, N] in grouped order; padding rows are 0.
    """
    if w.dim() != 3:
        raise ValueError(f"grouped_gemm: w must be [experts, N, D], got shape {tuple(w.shape)}")
    E, N, D = w.shape
    if x.dim() != 2 or x.shape[1] != D:
        raise ValueError(f"grouped_gemm: x must be [rows, {D}] to match w {tuple(w.shape)}, got {tuple(x.shape)}")
    if groups.counts.numel() != E:
        raise ValueError(f"grouped_gemm: groups cover {groups.counts.numel()} experts, w has {E}")
    if not gather and x.shape[0] != groups.num_slots:
        raise ValueError(f"grouped_gemm: gather=False needs x with {groups.num_slots} grouped rows, got {x.shape[0]}")
    if groups.block < 16 or groups.block & (groups.block - 1):
        raise ValueError(f"grouped_gemm: group the tokens with a power-of-two block >= 16, got {groups.block}")
    check_device("grouped_gemm", x, w)
    out_dtype = out_dtype or x.dtype
    P = groups.num_slots
    y = torch.empty(P, N, dtype=out_dtype, device=x.device)
    if P == 0 or N == 0:
        return y
    BLOCK_M = min(groups.block, 128)
    tile_expert = groups.tile_expert(BLOCK_M)
    BLOCK_N = 64 if interpreting() else 128
    BLOCK_D = 64
    rows = _source_rows(groups, gather)
    grid = (P // BLOCK_M, triton.cdiv(N, BLOCK_N))
    _grouped_gemm_kernel[grid](x, w, y, rows, tile_expert, P, N, D,
                               x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                               y.stride(0), y.stride(1),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
                               UPCAST=interpreting() or x.dtype == torch.float32,
                               PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
                               num_stages=1 if interpreting() else 3)
    return y
