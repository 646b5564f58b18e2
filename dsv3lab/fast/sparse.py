"""V3.2's decode selection and row gather in C, for the fused decode step (``step.py``).

The reference is the model's: ``Indexer.decode_select`` picks the ``index_topk`` keys of one
decode query and ``SparseAttention.decode_gathered`` copies the selected latent rows into one
buffer. Here the same arithmetic runs as one C call per sequence where the model allows it
(kernels/cpu/sparse_bf16.c): the indexer's projections, LayerNorm, RoPE and head weights, the key
written straight into its cache row, the scores by AMX tile products straight from the key cache
(on a CPU without AMX, torch's bf16 GEMM for the product and the C top-k of its logits), an exact
radix top-k with ``select_topk``'s tie rule; then the prefetching C gather of the rows. Each
runs only where it measured faster than torch on this CPU (``kernels/cpu_calibrate.py``:
``index_select``, ``gather``); otherwise the model's own code runs.

Modes the C does not compute are declined by name, and the model's own code runs: the C rotates
the indexer's RoPE in V3.2's half-split pairs, so an indexer with interleaved pairs (GLM-5,
``Indexer.rope_interleave``) is left to ``Indexer.decode_select`` (``selection_layout``); a GLM-5
shared layer has no indexer and takes the selection its source layer left (``gathered``), which the
full layer leaves whether C or torch selected it.

What the selection needs from a layer -- the weights' addresses, its key cache, the LayerNorm's
eps -- is checked once per set of addresses and dtypes and kept per indexer (``_LAYOUTS``), not
looked up through ``nn.Module`` attributes every step: in a decode step the interpreter's own data
has been pushed out of the caches by the weights streamed since the last layer.
"""

from __future__ import annotations

import threading
import weakref
from array import array

import torch

from dsv3lab.kernels import cpu_calibrate, cpu_decode, cpu_sparse
from dsv3lab.model.attn_sparse import SparseAttention, _gather_buffer
from dsv3lab.model.indexer import _KEY_BUCKET, Indexer, IndexerKeyCache, decode_topk
from dsv3lab.model.layers import LayerNorm, Linear, hooked, linear

# per indexer: (the key of what was checked, its verdict: the C call's arguments or False)
_LAYOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# the fused selection's scratch bytes, per thread (concurrent decodes in one process must not
# share it), kept between calls: a fresh allocation of this size (~100 KB at 8K keys) is an mmap
# whose pages fault in on every call
_WORKSPACE = threading.local()


def _workspace(nbytes: int) -> torch.Tensor:
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _WORKSPACE.buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
    return buf


def selection_layout(ix: Indexer, x, q_latent, cos, cache: IndexerKeyCache, layer: int):
    """Where ``select_fused`` may run for indexer ``ix``, what it needs -- the addresses of the weights and
    of this layer's key cache and the LayerNorm's eps -- else None. It runs for a bf16 model on
    the CPU with the sparse kernels built and no autograd, bf16 keys stored as they are scored
    (format "bf16", or "model" in a bf16 model), plain bf16 projections, and nothing hooked on
    what it skips (the projections, the LayerNorm, the q/k/weight hook points), and no torch
    dispatch mode active (``FlopCounterMode`` and the like must see the work as torch ops).

    Cheap on purpose: in a decode step the interpreter's own data has been pushed out of the
    caches by the weights streamed since the last layer, and each attribute lookup costs
    microseconds. Submodules and weights are read from their dicts (no ``Module.__getattr__``),
    and the layout checks run once per set of weight and cache addresses and dtypes."""
    if torch.is_grad_enabled() or cache.key_format == "fp8" or not cpu_decode.enabled(kernel="index_select"):
        return None                  # (the backend, a dispatch mode -- a flop counter, say -- sees torch ops only)
    if ix.rope_interleave:
        return None                  # GLM-5's interleaved indexer RoPE: the C rotates half-split pairs only
    mods = ix._modules
    if hooked(*(mods[name] for name in ("wq_b", "wk", "k_norm", "weights_proj", "hook_q", "hook_k",
                                        "hook_weights"))):
        return None
    buf = cache.layers[layer]
    ts = (buf, mods["wq_b"]._parameters["weight"], mods["wk"]._parameters["weight"],
          mods["k_norm"]._parameters["weight"], mods["k_norm"]._parameters["bias"],
          mods["weights_proj"]._parameters["weight"])
    # the modules themselves too: a wrapper swapped in around the same weight must be seen
    key = (tuple(t.data_ptr() for t in ts) + tuple(t.dtype for t in ts)
           + (buf.shape, cache.key_format, mods["wq_b"], mods["wk"], mods["k_norm"], mods["weights_proj"]))
    held = _LAYOUTS.get(ix)
    if held is None or held[0] != key:
        if _layout_ok(ix, cache, buf):
            H, D = ix.n_heads, ix.head_dim
            floats = array("d", (ix.k_norm.eps, H ** -0.5 * D ** -0.5))     # kept alive by the layout
            held = (key, (*key[:6], floats, floats.buffer_info()[0]))
        else:
            held = (key, False)
        _LAYOUTS[ix] = held
    layout = held[1]
    if (not layout or x.dtype != torch.bfloat16 or q_latent.dtype != torch.bfloat16
            or x.stride(-1) != 1 or q_latent.stride(-1) != 1
            or cos.dtype != torch.float32 or cos.numel() * 2 != ix.rope_dim or not cos.is_contiguous()
            or cpu_sparse.library() is None):
        return None
    return layout


def _layout_ok(ix: Indexer, cache: IndexerKeyCache, buf: torch.Tensor) -> bool:
    bf = torch.bfloat16
    return (cache.key_format == ix.key_format and buf.dtype == bf and buf.is_contiguous()
            and type(ix.k_norm) is LayerNorm and type(ix.weights_proj) is Linear
            and buf.device.type == "cpu" and ix.head_dim <= cpu_sparse.MAX_DIM and ix.rope_dim % 2 == 0
            and all(type(p) is Linear and p.weight.dtype == bf and p.weight.is_contiguous()
                    and p.weight.device.type == "cpu" for p in (ix.wq_b, ix.wk))
            and ix.k_norm.weight.dtype == ix.k_norm.bias.dtype == bf
            and ix.k_norm.weight.is_contiguous() and ix.k_norm.bias.is_contiguous()
            and ix.weights_proj.weight.dtype == torch.float32 and ix.weights_proj.weight.is_contiguous()
            and ix.weights_proj.weight.device.type == "cpu")

def select_fused(ix: Indexer, layout, x, q_latent, cos, sin, start: int, cache: IndexerKeyCache,
                 layer: int) -> torch.Tensor:
    """``ix.decode_select`` in one C call per sequence (where ``selection_layout`` gives a layout;
    kernels/cpu/sparse_bf16.c, ``dsv3_index_decode``): the query's and key's projections,
    LayerNorm and RoPE and the head weights, the key written straight into the cache, then the
    scores straight from the key cache by AMX tile products and an exact top-k. On a CPU
    without AMX, torch's bf16 GEMM for the [T,D] x [D,H] product (in row counts rounded up to
    _KEY_BUCKET, so its setup is reused) and the C top-k of its products follow the call. The arithmetic and roundings of
    ``project`` + ``decode_scores`` + ``decode_topk`` up to the order of fp32 additions; the
    selection comes back in increasing position order, with select_topk's tie rule."""
    lib = cpu_sparse.library()
    B = x.shape[0]
    if not (0 <= start < cache.max_len and B <= cache.batch):      # the C writes the key row at start
        raise ValueError(f"decode_select: position {start} of {B} sequences does not fit the indexer cache "
                         f"({cache.batch} sequences x {cache.max_len} positions)")
    bp, wq, wk, lnw, lnb, wp, _, fp = layout
    H, D, r = ix.n_heads, ix.head_dim, ix.rope_dim
    hidden, qlr = x.shape[-1], q_latent.shape[-1]
    nt, T = torch.get_num_threads(), start + 1
    k = min(ix.index_topk, T)
    # one workspace for the call (q, w, the projections' scratch, the top-k's): offsets, not tensors
    def up(n):
        return -(-n // 64) * 64                  # 64-byte aligned offsets
    oq = 0
    ow = up(2 * B * H * D)
    osc = ow + up(4 * B * H)
    owk = osc + up(2 * (H * D + D))
    ws = _workspace(owk + 12 * T)
    wsp = ws.data_ptr()
    xp, xs, qp, qs = x.data_ptr(), 2 * x.stride(0), q_latent.data_ptr(), 2 * q_latent.stride(0)
    cp, sp = cos.data_ptr(), sin.data_ptr()
    row = 2 * cache.max_len * D                                     # bytes per sequence in the cache
    out = torch.empty(B, k, dtype=torch.int64) if k < T else None
    op, wk0 = (out.data_ptr() if k < T else 0), wsp + owk
    # where the AMX tiles decline (-2), the C scorer where it beat torch's GEMM here
    c_scores = cpu_calibrate.wins("index_scores", torch.bfloat16)
    for b in range(B):
        qb, wb, ob = wsp + oq + 2 * b * H * D, wsp + ow + 4 * b * H, op + 8 * b * k
        # the projections, then the scores by AMX tiles straight from the cache and the top-k
        # (-2: no AMX here, or a shape the tiles do not take), in one call; its arguments
        # packed in one array (see the C: a ctypes argument costs microseconds in a step)
        args = array("q", (xp + b * xs, hidden, qp + b * qs, qlr, wq, wk, lnw, lnb, cp, sp, wp, H, D, r,
                           wsp + osc, qb, bp + b * row + 2 * start * D, wb, nt, bp + b * row, D, T, k, wk0, ob))
        n = lib.dsv3_index_decode(args.buffer_info()[0], fp)
        if k >= T or n >= 0:
            continue
        if n == -2 and c_scores:              # no AMX: the C scorer (each key row once for all heads), C top-k
            cpu_decode.library().dsv3_index_scores(bp + b * row, D, qb, wb, wk0, T, H, D, nt)
            n = lib.dsv3_topk_scores(wk0, T, k, wk0 + 4 * T, wk0 + 8 * T, ob)
            if n >= 0:
                continue
        buf = cache.layers[layer]
        # exact byte lengths: the slots are padded to 64 bytes, the views must not be
        q = ws[oq:oq + 2 * B * H * D].view(torch.bfloat16).view(B, H, D)
        w = ws[ow:ow + 4 * B * H].view(torch.float32).view(B, H)
        keys = buf[b, :min(cache.max_len, -(-T // _KEY_BUCKET) * _KEY_BUCKET)]   # read_bucketed, inline
        logits = linear(keys, q[b])                           # [T',H] bf16; rows past T are not read
        if n == -2:                           # no AMX: torch's bf16 GEMM, then the C top-k
            n = lib.dsv3_index_select(logits.data_ptr(), H, T, H, wb, k, wk0, wk0 + 4 * T, wk0 + 8 * T, ob)
        if n < 0:                             # a NaN score: torch's scores and top-k decide
            scores = torch.mv(logits[:T].float().clamp_min_(0), w[b])
            out[b] = decode_topk(scores[None], ix.index_topk)[0]
    if k >= T:                               # every key: no scores needed (dense MLA follows)
        return torch.arange(T, device=x.device).expand(B, T)
    return out


def select(ix: Indexer, x, q_latent, cos, sin, start: int, cache: IndexerKeyCache, layer: int) -> torch.Tensor:
    """``ix.decode_select``'s selection [B,k]: in C where the layout allows, else the model's."""
    layout = selection_layout(ix, x, q_latent, cos, cache, layer)
    if layout is not None:
        return select_fused(ix, layout, x, q_latent, cos, sin, start, cache, layer)
    return ix.decode_select(x, q_latent, cos, sin, start, cache, layer)


def gathered(impl: SparseAttention, x, q_latent, cos, sin, start: int, cache, layer: int,
             latent: torch.Tensor) -> torch.Tensor:
    """``impl.decode_gathered``: the selected latent rows [B,k,c+r] (``latent`` itself when k
    covers every key), selected by ``select`` and copied by the C gather where it wins."""
    ix = impl.mla._modules.get("indexer")
    if ix is None:                            # a GLM-5 shared layer: its source layer's selection
        idx = impl.shared_selection(layer, start, 1, x.shape[0])[:, 0]
        if bool((idx < 0).any()):
            raise ValueError(f"layer {layer}: the selection it shares has unused (-1) slots in a decode step")
    else:
        idx = select(ix, x, q_latent, cos, sin, start, cache.index_keys, layer)
        impl.keep_selection(layer, start, idx[:, None])
    B, k = idx.shape
    if k >= start + 1:
        return latent
    if not (cpu_decode.enabled(latent, kernel="gather") and latent.stride(-1) == 1 and idx.stride(-1) == 1
            and cpu_sparse.library() is not None):
        return impl.gather_rows(latent, idx)
    W = latent.shape[-1]
    rows = _gather_buffer((B, k, W), latent.dtype, latent.device)
    # every line of the rows ahead prefetched (kernels/cpu/sparse_bf16.c); the positions come from
    # the selection (in [0, start], unchecked here); arguments packed in one array (a ctypes
    # argument costs microseconds)
    lib, nt, ls, ip = cpu_sparse.library(), torch.get_num_threads(), latent.stride(0), idx.data_ptr()
    for b in range(B):
        args = array("q", (latent.data_ptr() + 2 * b * ls, latent.stride(1), ip + 8 * b * idx.stride(0),
                           k, W, rows.data_ptr() + 2 * b * k * W, nt))
        lib.dsv3_gather_packed(args.buffer_info()[0])
    return rows
