"""Which path the engine takes: Triton kernels or the torch code, chosen per call.

  DSV3LAB_KERNELS=auto    (default) kernels when every tensor is on CUDA and triton imports
  DSV3LAB_KERNELS=triton  always the kernels; CPU tensors then need TRITON_INTERPRET=1 (slow,
                          for tests), otherwise a clear error
  DSV3LAB_KERNELS=torch   never the kernels
``set_backend(name)`` overrides the variable for this process, ``use_backend(name)`` for a
``with`` block (a context variable, so threads and tasks do not leak into each other).

Each entry point returns ``None`` when the torch path should run, so a caller reads
``y = backend.fp8_linear(...); if y is None: <torch code>``. Shapes the kernels do not cover
(K not a multiple of 128, a non-e4m3 weight, mixed dtypes) also return ``None``.

Numerics differ on purpose between the paths: the FP8 path quantizes the *activations* to e4m3 in
1x128 tiles (what V3 inference does), the torch fallback multiplies by the dequantized weight.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ._common import have_triton, interpreting

BACKENDS = ("auto", "triton", "torch")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("dsv3lab_kernels", default=None)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    return _override.get() or _check(os.environ.get("DSV3LAB_KERNELS", "auto").strip().lower() or "auto")


def set_backend(name: str | None) -> None:
    """Force 'auto' | 'triton' | 'torch' for this process; None goes back to DSV3LAB_KERNELS."""
    _override.set(None if name is None else _check(name))


@contextlib.contextmanager
def use_backend(name: str):
    token = _override.set(_check(name))
    try:
        yield
    finally:
        _override.reset(token)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel should run on these tensors under the current backend."""
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return on_cuda and have_triton()
    if not have_triton():
        raise RuntimeError("DSV3LAB_KERNELS=triton but triton is not installed")
    if not on_cuda and not interpreting():
        devs = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"DSV3LAB_KERNELS=triton but tensors are on {devs}: the kernels need CUDA, "
                           f"or TRITON_INTERPRET=1 set before triton is imported")
    return True


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
               scale_fmt: str | None = None) -> torch.Tensor | None:
    """x [..., K] @ dequant(w [N, K], scale_inv).T as act_quant + fp8_gemm on a GPU, or one row on
    a CPU by the C GEMV that reads e4m3 as stored (``cpu_decode.gemv_fp8``, where it beat the torch
    path on this CPU), or None (torch path)."""
    K = x.shape[-1]
    if (w.dtype != torch.float8_e4m3fn or block_size != 128 or w.dim() != 2
            or w.shape[1] != K or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return None
    if (x.device.type == "cpu" and x.numel() == K and x.dtype in (torch.bfloat16, torch.float32)
            and scale_inv is not None and scale_inv.dtype == torch.float32 and w.stride(-1) == 1):
        from . import cpu_decode
        if cpu_decode.enabled(x, dtype=x.dtype, kernel="gemv_fp8") and not (torch.is_grad_enabled() and w.requires_grad):
            return cpu_decode.gemv_fp8(w, scale_inv, x, x.dtype).view(*x.shape[:-1], w.shape[0])
    if K % 128:
        return None
    if not use_triton(x, w, scale_inv):
        return None
    from .gemm import fp8_gemm
    from .quant import act_quant
    a, a_scale = act_quant(x.reshape(-1, K), 128, scale_fmt)
    y = fp8_gemm(a, a_scale, w, scale_inv.float(), out_dtype=x.dtype)
    return y.view(*x.shape[:-1], w.shape[0])


def mla_decode(q: torch.Tensor, latent: torch.Tensor, scale: float, kv_lora_rank: int
               ) -> torch.Tensor | None:
    """q [B, H, c+r] against the latent cache [B, T, c+r] -> [B, H, c], or None (torch path)."""
    if (q.dim() != 3 or latent.dim() != 3 or q.dtype != latent.dtype or q.shape[-1] != latent.shape[-1]
            or latent.stride(-1) != 1 or latent.shape[1] == 0):
        return None
    if not use_triton(q, latent):
        return None
    from .mla_attention import mla_decode as kernel
    return kernel(q.contiguous(), latent, scale, kv_lora_rank)
