"""The CPU decode kernels (``cpu/decode_bf16.c``): built on first use, called through ctypes.

A bf16 decode step on a CPU is memory-bound: each weight is read once for one activation row.
torch's one-row bf16 GEMV streams weights at a fraction of the copy bandwidth, and a step of a
small model spends as long again in torch op overhead. ``cpu/decode_bf16.c`` has the kernels of the
decode path, each replacing several torch calls (the first four also in fp32, for the fp32
model's fused decode step: ``kernel(name, dtype)``):

  gemv(w, x)                      x @ w.T for 1-8 rows; w may be a batch (per-head W_UK, W_UV)
  moe(x, experts, weights)        one token through its chosen experts (and the shared ones); experts
                                  kept FP8 are read as stored (their scales beside them)
  rmsnorm(x, w, eps), rope(x, cos, sin)   the small per-token ops, one call instead of 5-8
  route(scores, bias, ...)        the gate's group-limited top-k and weights, one call instead of 15
  index_scores(keys, q, w)        V3.2's indexer scores of one query against its key cache
  gemv_fp8(w, scale_inv, x)       x @ dequant(w).T for an FP8 weight kept as stored (e4m3, 128x128 scales)
  dequant_fp8(w, scale_inv, dt)   dequant(w) in bf16 or fp32, a band at a time for a prefill's GEMM
  latent_attention(q, latent, ...)   one token's attention over the latent cache (bf16 or fp32)
(V3.2's fused decode selection and row gather are ``cpu_sparse.py``'s, ``cpu/sparse_bf16.c``.)

The attention over the latent cache runs in C where it measured faster than torch's flash
attention (on an AVX2 EPYC); on a CPU with AMX torch's tile multiplies win (docs/kernels.md).

The library is built on first use for the CPU at hand (``cpu_compile.py``: ``-march=native``, or
the tier ``DSV3LAB_CPU_MARCH`` names); without a C compiler, or if the build fails,
``available()`` is False and the engine runs its torch code. Each kernel runs in the engine only
where it measured faster than the torch call it replaces on this CPU (``cpu_calibrate.py``:
``enabled(..., kernel=name)``). ``DSV3LAB_KERNELS=torch`` turns these kernels off like the Triton
ones.
"""

from __future__ import annotations

import ctypes
import functools
import re

import torch

from . import cpu_compile

SOURCE = cpu_compile.SOURCES / "decode_bf16.c"
MAX_ROWS = 8            # rows one gemv call takes (MAXM in the C source)
MAX_SLOTS = 64          # experts one moe call takes


def library() -> ctypes.CDLL | None:
    """The decode library (``cpu/decode_bf16.c``) for the current tier, signatures set, or None."""
    return _library(cpu_compile.march())


@functools.lru_cache(maxsize=None)
def _library(tier: str) -> ctypes.CDLL | None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    F = ctypes.c_float
    signatures = {
        "dsv3_gemv": [P, I64, I64, P, I64, I64, P, I64, I64, I, I, I, I, I],
        "dsv3_moe": [P, I, I, P, P, P, P, P, P, P, I],
        "dsv3_rmsnorm": [P, I64, P, F, P, I64, I, I],
        "dsv3_rope": [P, I64, P, P, P, I64, I, I],
    }
    signatures.update({name + "_f32": args for name, args in signatures.items()})    # the fp32 twins
    signatures.update({
        "dsv3_route": [P, P, I, I, I, I, I, I, F, P, P],
        "dsv3_index_scores": [P, I64, P, P, P, I, I, I, I],
        "dsv3_latent_attn_f32": [P, I64, P, I64, P, I, I, I, F, P, I64, P, I],
        "dsv3_latent_attn": [I, P, I64, P, I64, P, I, I, I, F, P, I64, P, I],
        "dsv3_gemv_fp8": [P, I64, P, I64, P, P, I, I, I, I],
        "dsv3_gemv_fp8_batched": [I, P, I64, I64, I64, P, I64, P, I64, P, I64, I, I, I, I],
        "dsv3_moe_mixed": [I, P, I, I, P, P, P, P, P, P, P, P, P, P, I],
        "dsv3_dequant_fp8": [P, I64, P, I64, P, I64, I, I, I, I],
        "dsv3_mla_in": [I, P, P, I],             # one layer around the attention (dsv3lab/fast/step.py)
        "dsv3_mla_out": [I, P, P, I],
        "dsv3_moe_routed": [I, P, I],            # the chosen experts from a table, the residual
        "dsv3_e4m3_lifted": ([I], I),            # which e4m3 form runs, where the tier has two
    })
    return cpu_compile.bound_library(SOURCE, tier, signatures)


@functools.lru_cache(maxsize=None)
def slots(prefix: str) -> dict[str, int]:
    """The argument slots of a packed C call by name, read from its enum in the C source -- the
    one definition, which Python fills by the same names: ``slots("IN")`` (``dsv3_mla_in``) ->
    {"X": 0, "NORM_W": 1, ..., "NSLOTS": 23}."""
    text = re.sub(r"/\*.*?\*/", "", SOURCE.read_text(), flags=re.S)
    for body in re.findall(r"enum\s*\{([^}]*)\}", text):
        names = [n.strip() for n in body.split(",") if n.strip()]
        if names and all(n.startswith(prefix + "_") for n in names):
            return {n[len(prefix) + 1:]: i for i, n in enumerate(names)}
    raise ValueError(f"no enum of {prefix}_ slots in {SOURCE.name}")


KERNEL_DTYPES = (torch.bfloat16, torch.float32)     # gemv, moe, rmsnorm and rope take either


def kernel(name: str, dtype: torch.dtype):
    """The C function ``name`` for tensors of ``dtype`` (bf16, or its ``_f32`` twin)."""
    if dtype not in KERNEL_DTYPES:
        raise ValueError(f"{name}: the C kernels take bf16 or fp32 tensors, not {dtype}")
    return getattr(library(), name if dtype == torch.bfloat16 else name + "_f32")


def available() -> bool:
    return library() is not None


def enabled(*tensors: torch.Tensor, dtype: torch.dtype | None = torch.bfloat16, kernel: str | None = None) -> bool:
    """Whether the C kernels should run on these tensors: all on the CPU in ``dtype`` (None: any),
    none that autograd would differentiate, no torch dispatch mode active (a ``FlopCounterMode``
    or a tracer must see the torch ops), the kernel backend 'auto' (``backend.get_backend``),
    the library built, and -- with ``kernel`` named (one of ``cpu_calibrate.KERNELS``) -- that
    kernel measured faster than its torch call on this CPU for this dtype (bf16 when ``dtype`` is
    None)."""
    from .backend import get_backend
    if torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        # the kernels have no backward: anything autograd would differentiate takes torch's path
        if (dtype is not None and t.dtype != dtype) or t.device.type != "cpu" or (grad and t.requires_grad):
            return False
    if get_backend() != "auto" or not available():
        return False
    if kernel is None:
        return True
    from .cpu_calibrate import wins
    return wins(kernel, dtype or torch.bfloat16)


def _rows_ok(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T in bf16 (fp32 sums, one rounding) or fp32: w [N, K] with x [M, K], or a batch
    w [b, N, K] with x [b, M, K] -> [b, M, N]; M <= MAX_ROWS, unit stride along K (x and w may be
    strided views otherwise), one dtype for all. ``out`` (same shape, unit stride along N)
    receives the result in place, e.g. a slice of a larger buffer."""
    if w.dim() == 3:
        nb, N, K = w.shape
        M = x.shape[1]
        fits = x.dim() == 3 and x.shape[0] == nb and x.shape[2] == K
        shape = (nb, M, N)
    else:                                  # one matrix: strides read directly (no [None] views per call)
        nb, (N, K), M = 1, w.shape, x.shape[0]
        fits = x.dim() == 2 and x.shape[1] == K
        shape = (M, N)
    if not fits or M > MAX_ROWS or not (_rows_ok(w) and _rows_ok(x)) or x.dtype != w.dtype:
        raise ValueError(f"gemv: w {tuple(w.shape)} {w.dtype} and x {tuple(x.shape)} {x.dtype} do not fit "
                         f"(M <= {MAX_ROWS}, unit stride, one dtype)")
    fn = kernel("dsv3_gemv", w.dtype)
    y = torch.empty(shape, dtype=w.dtype) if out is None else out
    if tuple(y.shape) != shape or y.dtype != w.dtype or not _rows_ok(y):
        raise ValueError(f"gemv: out {tuple(y.shape)} {y.dtype} is not a {w.dtype} {shape} with unit stride")
    if nb == 1 and w.dim() == 2:
        fn(w.data_ptr(), w.stride(0), 0, x.data_ptr(), x.stride(0), 0, y.data_ptr(), y.stride(0), 0,
           1, M, N, K, torch.get_num_threads())
    else:
        fn(w.data_ptr(), w.stride(1), w.stride(0), x.data_ptr(), x.stride(1), x.stride(0),
           y.data_ptr(), y.stride(1), y.stride(0), nb, M, N, K, torch.get_num_threads())
    return y


FP8_BLOCK = 128         # the block of one weight_scale_inv entry (the official layout)


def gemv_fp8(w: torch.Tensor, scale_inv: torch.Tensor, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [K] (bf16 or fp32) @ dequant(w).T for w e4m3 [N, K] (unit stride along K) with fp32
    ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] -> [N] in ``out_dtype`` (rounded once): the
    exact product of the stored weights, each block's scale applied to its partial sum in fp32
    (torch's path multiplies the weights dequantized into x's dtype: in bf16, each within 2^-9)."""
    N, K = w.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    if (w.dtype != torch.float8_e4m3fn or w.stride(-1) != 1 or x.numel() != K or out_dtype not in KERNEL_DTYPES
            or tuple(scale_inv.shape) != (nb, kb) or scale_inv.dtype != torch.float32 or scale_inv.stride(-1) != 1):
        raise ValueError(f"gemv_fp8: w {tuple(w.shape)} {w.dtype}, weight_scale_inv {tuple(scale_inv.shape)} "
                         f"{scale_inv.dtype}, x {tuple(x.shape)} do not fit (e4m3 with [{nb}, {kb}] fp32 scales, "
                         f"x of {K} values)")
    xf = x.reshape(-1).float().contiguous()
    y = torch.empty(N, dtype=out_dtype)
    library().dsv3_gemv_fp8(w.data_ptr(), w.stride(0), scale_inv.data_ptr(), scale_inv.stride(0), xf.data_ptr(),
                            y.data_ptr(), int(out_dtype == torch.bfloat16), N, K, torch.get_num_threads())
    return y


def e4m3_lifted(on: bool | None = None) -> bool:
    """Which form the FP8 dot products widen e4m3 in, where this tier has two (AVX2 with F16C):
    the lifted one (True) or F16C's conversion; ``on`` sets it (a no-op where the tier has one
    form). Returns the form in effect. The lifted form makes e4m3's subnormals fp32 subnormals,
    which Intel cores multiply by microcode assist (14x slower on a Sapphire Rapids' AVX2 tier
    with 1/12 of the weights subnormal), AMD's at full rate (where it is ~1.2x F16C's):
    ``cpu_calibrate`` measures both and sets the faster. False without the library."""
    lib = library()
    if lib is None:
        return False
    return bool(lib.dsv3_e4m3_lifted(-1 if on is None else int(bool(on))))


def dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequant(w) [N, K] in ``dtype`` (bf16, rounded to nearest even, or fp32) for w e4m3 [N, K]
    (unit stride along K) with fp32 ``weight_scale_inv`` [ceil(N/128), ceil(K/128)]:
    ``fp8.weight_dequant``'s values, for a prefill's GEMM."""
    N, K = w.shape
    nb, kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    if (w.dtype != torch.float8_e4m3fn or w.stride(-1) != 1 or dtype not in KERNEL_DTYPES
            or tuple(scale_inv.shape) != (nb, kb) or scale_inv.dtype != torch.float32 or scale_inv.stride(-1) != 1):
        raise ValueError(f"dequant_fp8: w {tuple(w.shape)} {w.dtype}, weight_scale_inv {tuple(scale_inv.shape)} "
                         f"{scale_inv.dtype} do not fit (e4m3 with [{nb}, {kb}] fp32 scales, into bf16 or fp32)")
    out = torch.empty(N, K, dtype=dtype)
    library().dsv3_dequant_fp8(w.data_ptr(), w.stride(0), scale_inv.data_ptr(), scale_inv.stride(0), out.data_ptr(),
                               K, int(dtype == torch.float32), N, K, torch.get_num_threads())
    return out


def moe(x: torch.Tensor, gate: list, up: list, down: list, weights: torch.Tensor, scales: list | None = None
        ) -> torch.Tensor:
    """One token x [K] through experts s (gate[s], up[s] [I_s, K], down[s] [K, I_s], contiguous,
    x's dtype: bf16 or fp32): sum_s weights[s] * down_s(silu(gate_s x) * up_s x), fp32 [K].
    ``scales[s]`` = (gate, up, down) ``weight_scale_inv`` of an expert kept FP8 (its weights e4m3,
    read as stored, as ``gemv_fp8`` reads them), None for an expert in x's dtype."""
    n = len(gate)
    if not (0 < n <= MAX_SLOTS) or weights.numel() != n or not x.is_contiguous():
        raise ValueError(f"moe: {n} experts with {weights.numel()} weights (1..{MAX_SLOTS}), x contiguous")
    if scales is not None and len(scales) != n:
        raise ValueError(f"moe: {len(scales)} scale triples for {n} experts")
    K = x.numel()
    sc_ptrs = [[0] * n for _ in range(3)]
    for s, ws3 in enumerate(zip(gate, up, down)):
        triple = scales[s] if scales is not None else None
        for j, t in enumerate(ws3):
            shape = (ws3[0].shape[0], K) if j < 2 else (K, ws3[0].shape[0])
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise ValueError(f"moe: expert {s}'s weight {tuple(t.shape)} is not a contiguous {shape}")
            if triple is None:
                if t.dtype != x.dtype:
                    raise ValueError(f"moe: expert {s}'s weight is {t.dtype}, not x's {x.dtype} (FP8 needs its scales)")
                continue
            grid = (-(-shape[0] // FP8_BLOCK), -(-shape[1] // FP8_BLOCK))
            si = triple[j]
            if (t.dtype != torch.float8_e4m3fn or si is None or tuple(si.shape) != grid or si.dtype != torch.float32
                    or not si.is_contiguous()):
                raise ValueError(f"moe: expert {s}'s weight {tuple(t.shape)} {t.dtype} with scales "
                                 f"{None if si is None else (tuple(si.shape), si.dtype)} is not e4m3 with "
                                 f"contiguous fp32 {list(grid)} scales")
            sc_ptrs[j][s] = si.data_ptr()
    inter = [g.shape[0] for g in gate]
    ptr = ctypes.c_int64 * n
    g_p = ptr(*[t.data_ptr() for t in gate])
    u_p = ptr(*[t.data_ptr() for t in up])
    d_p = ptr(*[t.data_ptr() for t in down])
    i_p = (ctypes.c_int * n)(*inter)
    ws = weights.to(torch.float32).contiguous()
    h = torch.empty(sum(inter), dtype=x.dtype)
    y = torch.empty(K, dtype=torch.float32)
    nt = torch.get_num_threads()
    if scales is None:
        kernel("dsv3_moe", x.dtype)(x.data_ptr(), K, n, g_p, u_p, d_p, i_p, ws.data_ptr(), h.data_ptr(), y.data_ptr(),
                                    nt)
    else:
        kernel("dsv3_moe", x.dtype)                  # the dtype check
        library().dsv3_moe_mixed(int(x.dtype == torch.float32), x.data_ptr(), K, n, g_p, u_p, d_p,
                               *(ptr(*p) for p in sc_ptrs), i_p, ws.data_ptr(), h.data_ptr(), y.data_ptr(), nt)
    return y


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x [..., D] (bf16 or fp32, rounded as ``layers.RMSNorm`` rounds)
    -> a new tensor."""
    D = x.shape[-1]
    rows = x.reshape(-1, D)
    if rows.stride(-1) != 1 or w.numel() != D or not w.is_contiguous() or w.dtype != x.dtype:
        raise ValueError(f"rmsnorm: x {tuple(x.shape)} {x.dtype} and weight {tuple(w.shape)} {w.dtype} do not fit")
    y = torch.empty(rows.shape, dtype=x.dtype)
    kernel("dsv3_rmsnorm", x.dtype)(rows.data_ptr(), rows.stride(0), w.data_ptr(), float(eps), y.data_ptr(), D,
                                    rows.shape[0], D)
    return y.view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE of every row of x [..., d] (bf16 or fp32) at one position (cos/sin
    hold d/2 fp32 values) -> a new contiguous tensor of x's dtype."""
    d = x.shape[-1]
    rows = x.reshape(-1, d)
    cs, sn = cos.reshape(-1), sin.reshape(-1)
    if (rows.stride(-1) != 1 or d % 2 or cs.numel() != d // 2 or sn.numel() != d // 2
            or cs.dtype != torch.float32 or sn.dtype != torch.float32):
        raise ValueError(f"rope: x {tuple(x.shape)} with cos {tuple(cos.shape)} do not fit (one position)")
    cs, sn = cs.contiguous(), sn.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype)
    kernel("dsv3_rope", x.dtype)(rows.data_ptr(), rows.stride(0), cs.data_ptr(), sn.data_ptr(), y.data_ptr(), d,
                                 rows.shape[0], d)
    return y.view(x.shape)


ATT_BLK = 128           # rows whose scores one thread holds at once (the C source's ATT_BLK)


ATT_TR_MAX = 12         # the most rows a scores tile reads (the C source's ATT_TR_MAX)


def attention_work(H: int, D: int, c: int, threads: int) -> int:
    """fp32 scratch values ``latent_attention`` needs with ``threads`` threads: the transposed
    query (heads padded to a multiple of 16), then per thread its softmax state (3 x padded heads),
    output, block scores and the block's rows as fp32 (a stride of at most D + 32)."""
    hp = -(-H // 16) * 16
    return D * hp + threads * (3 * hp + H * c + ATT_BLK * hp + (ATT_BLK + ATT_TR_MAX) * (D + 32))


def latent_attention(q: torch.Tensor, latent: torch.Tensor, scale: float, c: int, idx: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    """One query token's MLA attention in the latent space: q [H, D] (H a multiple of 4) over the
    rows of latent [T, D] (unit stride along D), or only over rows ``idx`` [k] int64 when given
    (read in place, any order) -> o [H, c] = softmax(scale q . rows^T) rows[:, :c] in latent's
    dtype (bf16 or fp32; fp32 arithmetic, a bf16 output rounded once). ``out`` [H, c] with unit
    stride along c receives it in place; ``work`` (fp32, ``attention_work`` values or more) is its
    scratch, kept by a caller that attends every step (a fresh one of ~0.3 MB a thread is an mmap
    whose pages fault in on every call)."""
    H, D = q.shape
    T, W = latent.shape
    if (W != D or H % 4 or latent.stride(-1) != 1 or not 0 < c <= D or latent.dtype not in KERNEL_DTYPES
            or q.dtype not in KERNEL_DTYPES):
        raise ValueError(f"latent_attention: q {tuple(q.shape)} {q.dtype} and latent {tuple(latent.shape)} "
                         f"{latent.dtype} do not fit (bf16 or fp32, H a multiple of 4, c = {c} <= D)")
    q = q.float().contiguous()                       # exact for a bf16 q
    n = T
    if idx is not None:
        idx = idx.contiguous()
        n = idx.numel()
        if idx.dtype != torch.int64 or (n and (int(idx.min()) < 0 or int(idx.max()) >= T)):
            raise ValueError(f"latent_attention: idx must be int64 positions in [0, {T})")
    if n == 0:
        raise ValueError("latent_attention: no rows to attend to")
    dt = latent.dtype
    y = torch.empty(H, c, dtype=dt) if out is None else out
    if tuple(y.shape) != (H, c) or y.dtype != dt or y.stride(-1) != 1:
        raise ValueError(f"latent_attention: out {tuple(y.shape)} {y.dtype} is not a {dt} {(H, c)} with unit stride")
    nt = torch.get_num_threads()
    need = attention_work(H, D, c, nt)
    if work is None:
        work = torch.empty(need, dtype=torch.float32)
    elif work.dtype != torch.float32 or work.numel() < need or not work.is_contiguous():
        raise ValueError(f"latent_attention: work must be {need} contiguous fp32 values, got {work.numel()} {work.dtype}")
    library().dsv3_latent_attn(int(dt == torch.bfloat16), latent.data_ptr(), latent.stride(0),
                               None if idx is None else idx.data_ptr(), n, q.data_ptr(), H, D, c, float(scale),
                               y.data_ptr(), y.stride(0), work.data_ptr(), nt)
    return y


MAX_EXPERTS, MAX_GROUPS = 1024, 256      # the C selection's fixed buffers


def route(scores: torch.Tensor, bias: torch.Tensor | None, n_group: int, topk_group: int, k: int,
          norm: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert selection from fp32 scores [T, E] (see ``model/moe.py``'s docstring) ->
    (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
    T, E = scores.shape
    if (scores.dtype != torch.float32 or not scores.is_contiguous() or E > MAX_EXPERTS or n_group > MAX_GROUPS
            or E % n_group or k > E or (bias is not None and (bias.dtype != torch.float32 or bias.numel() != E))):
        raise ValueError(f"route: scores {tuple(scores.shape)} {scores.dtype}, {n_group} groups, k={k} do not fit")
    ids = torch.empty(T, k, dtype=torch.int64)
    w = torch.empty(T, k, dtype=torch.float32)
    b = None if bias is None else bias.contiguous()
    library().dsv3_route(scores.data_ptr(), None if b is None else b.data_ptr(), T, E, n_group, topk_group, k,
                         int(norm), float(scale), ids.data_ptr(), w.data_ptr())
    return ids, w


def index_scores(keys: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """keys [T, D] bf16 (unit stride along D), q [H, D] bf16, w [H] fp32 ->
    sum_h w[h] relu(bf16(q[h] . keys[t])) [T] fp32."""
    T, D = keys.shape
    H = q.shape[0]
    q, w = q.contiguous(), w.float().contiguous()
    if keys.stride(-1) != 1 or q.shape[1] != D or w.numel() != H or q.dtype != torch.bfloat16:
        raise ValueError(f"index_scores: keys {tuple(keys.shape)}, q {tuple(q.shape)}, w {tuple(w.shape)} do not fit")
    out = torch.empty(T, dtype=torch.float32)
    library().dsv3_index_scores(keys.data_ptr(), keys.stride(0), q.data_ptr(), w.data_ptr(), out.data_ptr(), T, H, D,
                                torch.get_num_threads())
    return out
