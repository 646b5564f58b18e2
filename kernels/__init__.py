"""Triton kernels, each beside its torch reference; imported as ``dsv3lab.kernels``.

  act_quant, weight_quant, weight_dequant   FP8 block quantization           (quant.py)
  fp8_gemm                                  block-scaled FP8 GEMM a @ b.T    (gemm.py)
  group_tokens, grouped_gemm                MoE token grouping + expert GEMM (moe_group.py)
  mla_decode                                absorbed-MLA decode attention    (mla_attention.py)
  dispatch                                  which path the engine takes      (dispatch.py)

Importing this package is cheap and works without triton: the kernel modules (which import
triton) load on first attribute access. ``dispatch`` never needs triton to answer "use torch".
"""

from __future__ import annotations

import importlib

_WHERE = {
    "act_quant": "quant", "weight_quant": "quant", "weight_dequant": "quant",
    "act_quant_ref": "quant", "weight_quant_ref": "quant", "weight_dequant_ref": "quant",
    "fp8_gemm": "gemm", "fp8_gemm_ref": "gemm",
    "group_tokens": "moe_group", "group_tokens_ref": "moe_group", "TokenGroups": "moe_group",
    "grouped_gemm": "moe_group", "grouped_gemm_ref": "moe_group",
    "mla_decode": "mla_attention", "mla_decode_ref": "mla_attention",
}

__all__ = sorted(_WHERE) + ["dispatch"]


def __getattr__(name):
    if name == "dispatch":
        return importlib.import_module(".dispatch", __name__)
    if name in _WHERE:
        mod = importlib.import_module("." + _WHERE[name], __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
