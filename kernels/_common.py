"""Shared plumbing for the kernels: lazy triton import, interpreter detection, exact rounding.

Triton is imported only when a kernel is first called, so ``import dsv3lab.kernels`` works on a
machine without triton. Under ``TRITON_INTERPRET=1`` (CPU) the interpreter gets fp32 -> fp8 and
fp32 -> bf16 casts wrong (docs/references.md#triton-interpreter: ties away from zero, lost
carries, truncation). The
kernels therefore never ask the cast to *round*: they round in fp32 arithmetic (``_jit``) to a value the
target format represents exactly (``round_to_e4m3`` / ``round_to_bf16``) and only then cast, which
is exact on every backend. On a GPU this costs a handful of integer ops in kernels that are
memory-bound anyway, and it means the CPU tests check the very code that runs on the GPU.
"""

from __future__ import annotations

import functools
import os

FP8_MAX = 448.0


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def have_triton() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def require_triton():
    if not have_triton():
        raise RuntimeError("dsv3lab.kernels needs triton (pip install triton); use the torch "
                           "references in dsv3lab.fp8 or set DSV3LAB_KERNELS=torch")


def check_device(name: str, *tensors) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1."""
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(f"{name}: tensor on {t.device} needs CUDA (or TRITON_INTERPRET=1 for CPU)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
