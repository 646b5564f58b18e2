"""FP8 (e4m3) block quantization, the DeepSeek-V3 recipe, as plain torch references.

Weights: 128x128 blocks, one fp32 ``weight_scale_inv`` per block = amax/448, so that
  w ~= fp8 * scale_inv       (dequantize by *multiplying*; the name says "inverse" of the scale
                               that quantization divides by).
A matrix whose sides are not multiples of 128 is zero-padded up to whole blocks before the amax is
taken and cut back afterwards: ``kv_a_proj_with_mqa`` [576, 7168] has scale_inv [5, 56].
Activations: 1x128 tiles along the last dimension, scale = max(amax, 1e-4)/448 -- the floor makes
an all-zero tile quantize to zeros instead of 0/0 = NaN. ``ue8m0`` rounds the scale *up* to a
power of two (V3.1's ``scale_fmt``), so no value overflows after rounding. A ue8m0 checkpoint
stores power-of-two weight scales too (an 8-bit exponent with no mantissa, hence no zero: an
all-zero block gets scale 1, which dequantizes its zeros to zeros all the same).

A rank of a tensor-parallel run holds a window of a weight that need not start on a block
boundary: ``weight_dequant(..., offset=(r, c))`` says where the window's first element sits
inside the first scale block it touches, so the one dequantizer serves whole weights and slices.

fp32 -> e4m3 uses torch's round-to-nearest-even with saturation at +-448 (we clamp first: a
value that rounds past 448 would otherwise become NaN in e4m3fn, which has no infinity).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsv3lab.kernels.fp8_grid import check_scale_shape, scale_grid  # noqa: F401  (one definition, below both)

FP8_MAX = 448.0
E4M3 = torch.float8_e4m3fn


def _pad_to(x: torch.Tensor, b: int) -> torch.Tensor:
    M, N = x.shape[-2:]
    pm, pn = (-M) % b, (-N) % b
    return F.pad(x, (0, pn, 0, pm)) if pm or pn else x


def round_scale_up_pow2(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= scale (read from the exponent: log2 rounding can go down)."""
    mant, exp = torch.frexp(scale)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.ldexp(torch.ones_like(scale), exp)


def is_pow2(scale: torch.Tensor) -> torch.Tensor:
    """Elementwise: a positive finite power of two (what a ue8m0 scale can hold)."""
    mant, _ = torch.frexp(scale.float())
    return (mant == 0.5) & torch.isfinite(scale)


def scale_of_amax(amax: torch.Tensor, scale_fmt: str | None = None) -> torch.Tensor:
    """A block's ``weight_scale_inv`` from its largest |w|: amax / 448 maps the block onto e4m3's
    range; ``"ue8m0"`` rounds that up to a power of two (1 for an all-zero block)."""
    scale_inv = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        return torch.where(scale_inv > 0, round_scale_up_pow2(scale_inv), torch.ones_like(scale_inv))
    if scale_fmt is not None:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    return scale_inv


def weight_quant(w: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M,N] -> (e4m3 [M,N], scale_inv fp32 [ceil(M/b), ceil(N/b)]). All-zero blocks give 0
    (1 under ``scale_fmt="ue8m0"``, whose scales are powers of two rounded up)."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    M, N = w.shape
    b = block_size
    wp = _pad_to(w.float(), b)
    mb, nb = wp.shape[0] // b, wp.shape[1] // b
    blocks = wp.view(mb, b, nb, b)
    scale_inv = scale_of_amax(blocks.abs().amax(dim=(1, 3)), scale_fmt)
    safe = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    q = (blocks / safe[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return q.view(mb * b, nb * b)[:M, :N].contiguous(), scale_inv.contiguous()


def weight_dequant(q: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.float32, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """e4m3 [M,N] * per-block scale_inv [ceil(M/b), ceil(N/b)] -> dtype [M,N].

    ``offset=(r, c)``: q is a window of a larger weight whose element [0, 0] sits at row r,
    column c of the block that ``scale_inv[0, 0]`` scales (0 <= r, c < b)."""
    if q.dim() != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {tuple(q.shape)}")
    M, N = q.shape
    b = block_size
    r, c = offset
    if not (0 <= r < b and 0 <= c < b):
        raise ValueError(f"weight_dequant: offset {offset} must lie inside one {b}x{b} block")
    check_scale_shape(M, N, scale_inv, b, offset=offset)
    s = scale_inv.float().repeat_interleave(b, 0)[r:r + M].repeat_interleave(b, 1)[:, c:c + N]
    return (q.float() * s).to(dtype)


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K % block_size == 0) -> (e4m3 [..., K], fp32 scale [..., K/block_size])."""
    K = x.shape[-1]
    if K % block_size:
        raise ValueError(f"act_quant: last dimension {K} is not a multiple of block_size {block_size}")
    t = x.float().reshape(*x.shape[:-1], K // block_size, block_size)
    amax = t.abs().amax(dim=-1).clamp_min(1e-4)
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = round_scale_up_pow2(scale)
    y = (t / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return y.reshape(x.shape), scale


def act_dequant(y: torch.Tensor, scale: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    K = y.shape[-1]
    t = y.float().reshape(*y.shape[:-1], K // block_size, block_size) * scale[..., None]
    return t.reshape(y.shape)


def fp8_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                 block_size: int = 128) -> torch.Tensor:
    """Reference block-scaled GEMM a @ b.T in fp32: a e4m3 [M,K] with [M,K/128] scales,
    b e4m3 [N,K] with [ceil(N/128), K/128] scales; each K slice is scaled then accumulated."""
    M, K = a.shape
    N = b.shape[0]
    nk = K // block_size
    out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    bs = b_scale.float().repeat_interleave(block_size, 0)[:N]             # [N, nk]
    for j in range(nk):
        sl = slice(j * block_size, (j + 1) * block_size)
        part = a[:, sl].float() @ b[:, sl].float().T
        out += part * a_scale[:, j:j + 1].float() * bs[None, :, j]
    return out


DEQUANT_BAND = 1 << 21     # weight elements dequantized at a time by ``fp8_linear`` (8 MB of fp32)


def _dequant_band(q: torch.Tensor, scale_inv: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
    """``weight_dequant`` of whole 128-row bands: by the C dequantizer where it measured faster
    than torch on this CPU (``cpu_decode.dequant_fp8``: torch widens e4m3 at ~45 M elements/s on
    an AVX2 EPYC, which made a kept model's prefill cost minutes), else by broadcasting each
    block's scale (no [M, N] scale matrix) where the columns fill whole blocks too."""
    M, N = q.shape
    if (b == 128 and q.device.type == "cpu" and q.dtype == E4M3 and dtype in (torch.bfloat16, torch.float32)
            and scale_inv.dtype == torch.float32 and q.stride(-1) == 1 and scale_inv.stride(-1) == 1):
        from dsv3lab.kernels import cpu_decode
        if cpu_decode.enabled(dtype=dtype, kernel="dequant_fp8") and not (torch.is_grad_enabled() and q.requires_grad):
            return cpu_decode.dequant_fp8(q, scale_inv, dtype)
    if M % b or N % b:
        return weight_dequant(q, scale_inv, b, dtype)
    w = q.float().view(M // b, b, N // b, b) * scale_inv.float()[:, None, :, None]
    return w.view(M, N).to(dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """y = x @ dequant(w).T: every ``Linear`` whose weight is kept FP8 computes here.

    First ``dsv3lab.kernels.backend.fp8_linear`` may take the call (an FP8 GEMM on a GPU; a
    kernel that reads e4m3 in place belongs there too, returning None where it declines). Else
    the weight is dequantized here a band of 128-row blocks at a time (``DEQUANT_BAND``
    elements: the transient memory stays a few MB whatever the weight's size), each band into
    ``x.dtype`` exactly as ``weight_dequant`` would, and multiplied by the CPU linear policy
    (``dsv3lab.model.layers.linear``). Each output is one band's dot product, so the result is
    the dequantized model's up to the order of the sums (decode and prefill alike)."""
    try:
        from dsv3lab.kernels import backend
        y = backend.fp8_linear(x, w, scale_inv, block_size)
        if y is not None:
            return y
    except ImportError:
        pass
    from dsv3lab.model.layers import linear
    N, K = w.shape
    b = block_size
    rows = max(b, DEQUANT_BAND // max(K, 1) // b * b)
    if rows >= N:
        return linear(x, _dequant_band(w, scale_inv, b, x.dtype))
    out = x.new_empty(*x.shape[:-1], N)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        band = _dequant_band(w[r0:r1], scale_inv[r0 // b:math.ceil(r1 / b)], b, x.dtype)
        out[..., r0:r1] = linear(x, band)
    return out
