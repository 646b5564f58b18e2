"""FP8 e4m3 quantization of weights at load (``cpu/quant_fp8.c``): built on first use, called through ctypes.

  block_amax(w, block)            max |w| per block x block block (NaN where a block holds one)
  quant_fp8(w, scale_inv, block)  e4m3(clamp(w / s, -448, 448)) per block, s its scale (1 where 0)

Together with the scale rule (``dsv3lab.fp8.scale_of_amax``: amax / 448, or UE8M0) they give
``dsv3lab.fp8.weight_quant``'s values bit for bit, at memory speed, without its fp32
temporaries; ``dsv3lab.checkpoint.loading`` quantizes bf16 releases with them (fp8="quantize").
``library()`` is None without a compiler or when the build fails, and callers then run the
torch code.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu_compile

SOURCE = cpu_compile.SOURCES / "quant_fp8.c"
INPUT_DTYPES = (torch.bfloat16, torch.float32)


def library() -> ctypes.CDLL | None:
    """The quantizer library (``cpu/quant_fp8.c``) for the current tier, signatures set, or None."""
    return _library(cpu_compile.march())


@functools.lru_cache(maxsize=None)
def _library(tier: str) -> ctypes.CDLL | None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return cpu_compile.bound_library(SOURCE, tier, {"dsv3_block_amax": [I, P, I64, I, I, I, P, I64, I],
                                                    "dsv3_quant_fp8": [I, P, I64, P, I64, P, I64, I, I, I, I]})


def enabled(w: torch.Tensor) -> bool:
    """Whether to quantize ``w`` here: a bf16 or fp32 CPU weight with unit stride along its rows,
    the kernel backend 'auto' (``backend.get_backend``: "torch" keeps every op torch's) and the
    library built."""
    from .backend import get_backend
    return (w.dim() == 2 and w.dtype in INPUT_DTYPES and w.device.type == "cpu" and w.stride(-1) == 1
            and get_backend() == "auto" and library() is not None)


def _check(fn: str, w: torch.Tensor, block: int) -> None:
    if (w.dim() != 2 or w.dtype not in INPUT_DTYPES or w.device.type != "cpu" or w.stride(-1) != 1
            or w.stride(0) < max(w.shape[1], 1) or block <= 0):
        raise ValueError(f"{fn}: w {tuple(w.shape)} {w.dtype} on {w.device} (strides {w.stride()}), block {block}: "
                         f"needs a 2-D bf16 or fp32 CPU weight with unit stride along its rows and a positive block")


def block_amax(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """amax [ceil(M/b), ceil(N/b)] fp32 of w [M, N]: each block's largest |w| (NaN if it holds one)."""
    _check("block_amax", w, block)
    M, N = w.shape
    out = torch.empty(-(-M // block), -(-N // block), dtype=torch.float32)
    library().dsv3_block_amax(int(w.dtype == torch.float32), w.data_ptr(), w.stride(0), M, N, block, out.data_ptr(),
                              out.stride(0), torch.get_num_threads())
    return out


def quant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """e4m3 [M, N] = e4m3(clamp(w / s, -448, 448)), s = scale_inv of w's block where > 0, else 1;
    into ``out`` (contiguous e4m3 [M, N]) when given."""
    _check("quant_fp8", w, block)
    M, N = w.shape
    grid = (-(-M // block), -(-N // block))
    if tuple(scale_inv.shape) != grid or scale_inv.dtype != torch.float32 or scale_inv.stride(-1) != 1:
        raise ValueError(f"quant_fp8: scale_inv {tuple(scale_inv.shape)} {scale_inv.dtype} for w {tuple(w.shape)}: "
                         f"needs fp32 {list(grid)} with unit stride along its rows")
    if out is not None and (tuple(out.shape) != (M, N) or out.dtype != torch.float8_e4m3fn
                            or not out.is_contiguous()):
        raise ValueError(f"quant_fp8: out {tuple(out.shape)} {out.dtype} for w {tuple(w.shape)}: "
                         f"needs a contiguous float8_e4m3fn [{M}, {N}]")
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn) if out is None else out
    library().dsv3_quant_fp8(int(w.dtype == torch.float32), w.data_ptr(), w.stride(0), scale_inv.data_ptr(),
                             scale_inv.stride(0), q.data_ptr(), q.stride(0), M, N, block, torch.get_num_threads())
    return q
