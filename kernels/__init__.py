"""The engine's kernels, imported as ``dsv3lab.kernels``: Triton for GPUs, C for CPUs.

Triton (GPU; on a CPU only under TRITON_INTERPRET=1, for tests), each beside a torch reference:
  act_quant, weight_quant, weight_dequant   FP8 block quantization           (quant.py; reference:
                                                                              dsv3lab/fp8.py)
  fp8_gemm                                  block-scaled FP8 GEMM a @ b.T    (gemm.py; reference:
                                                                              dsv3lab.fp8.fp8_gemm_ref)
  group_tokens, grouped_gemm                MoE token grouping + expert GEMM (moe_group.py)
  mla_decode                                absorbed-MLA decode attention    (mla_attention.py)
  backend                                   Triton kernels or torch, per call (backend.py)
C (CPU decode; sources in cpu/, compiled on first use for the CPU at hand, called through ctypes):
  cpu_compile     compiling cpu/*.c for an ISA tier (DSV3LAB_CPU_MARCH)
  cpu_decode      GEMV, MoE token, RMSNorm, RoPE, routing, latent attention (cpu/decode_bf16.c)
  cpu_sparse      V3.2's indexer selection and row gather (cpu/sparse_bf16.c)
  cpu_quant       FP8 e4m3 block quantization of weights at load (cpu/quant_fp8.c)
  cpu_calibrate   which of them beat the torch call they replace on this CPU
  fp8_grid        the FP8 block-scale grid (shared with dsv3lab/fp8.py)

Importing this package is cheap and works without triton or a C compiler: the kernel modules
load on first use. ``backend`` never needs triton to answer "use torch". Nothing here imports
the rest of dsv3lab (the model calls down into the kernels, never the other way).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "act_quant": "quant", "weight_quant": "quant", "weight_dequant": "quant",
    "fp8_gemm": "gemm",
    "group_tokens": "moe_group", "group_tokens_ref": "moe_group", "TokenGroups": "moe_group",
    "grouped_gemm": "moe_group", "grouped_gemm_ref": "moe_group",
    "mla_decode": "mla_attention", "mla_decode_ref": "mla_attention",
}

__all__ = sorted(_WHERE) + ["backend"]


def __getattr__(name):
    if name == "backend":
        return importlib.import_module(".backend", __name__)
    if name in _WHERE:
        mod = importlib.import_module("." + _WHERE[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
