"""Small building blocks shared by every part of the model: hook points, RMSNorm, Linear, SwiGLU."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _mm

from dsv3lab.kernels import cpu_compile


def hooked(*modules: nn.Module) -> bool:
    """Whether a probe watches any of ``modules`` (a forward or forward-pre hook on it) or every
    module (a global forward hook): the one test of "is anything hooked here". Code that skips
    modules -- the C kernels, the fused decode step -- takes the module path when it is True."""
    if _mm._global_forward_hooks or _mm._global_forward_pre_hooks:
        return True
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks:
            return True
    return False


SHARDED = "_dsv3_sharded"


def mark_sharded(*modules: nn.Module) -> None:
    """Marks modules whose computation a parallel layout changed (``dsv3lab.parallel.apply``:
    the model, an MoE with an expert-parallel dispatch)."""
    for m in modules:
        m.__dict__[SHARDED] = True


def sharded(module: nn.Module) -> bool:
    """Whether a parallel layout changed this module (the one test; fused paths step aside)."""
    return module.__dict__.get(SHARDED, False)


class HookPoint(nn.Module):
    """Identity module with a stable dotted name (TransformerLens style).

    Probes attach forward hooks to it (``dsv3lab.probes``); with nothing attached it costs one
    module call. ``shape`` documents what passes through, for ``dsv3lab.probes.hook_names``.
    """

    def __init__(self, shape: str = ""):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x

    def __call__(self, x):
        # fast path: with nothing attached (here or globally) skip nn.Module's dispatch
        if hooked(self):
            return super().__call__(x)
        return x

    def extra_repr(self) -> str:
        return self.shape

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks) or bool(self._forward_pre_hooks)


class RMSNorm(nn.Module):
    """RMSNorm in fp32, cast back to the input dtype before the (learned) scale, as HF does."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); without it oneDNN
    emulates bf16 GEMMs at a fraction of fp32 speed. ``DSV3LAB_CPU_BF16=native|upcast``
    overrides the detection (read once, at import)."""
    mode = os.environ.get("DSV3LAB_CPU_BF16", "auto")
    if mode in ("native", "upcast"):
        return mode == "native"
    if mode != "auto":
        raise ValueError(f"DSV3LAB_CPU_BF16 must be 'native', 'upcast' or 'auto', got {mode!r}")
    flags = cpu_compile.cpu_flags()
    return not flags or "avx512_bf16" in flags or "amx_bf16" in flags       # no /proc/cpuinfo: trust the CPU


_NATIVE_BF16 = _cpu_has_native_bf16()
UPCAST_MIN_ROWS = 16   # below this a GEMM is a memory-bound GEMV: reading bf16 weights wins


def cpu_bf16_policy() -> str:
    """"native" (bf16 GEMMs run in bf16) or "upcast" (bf16 storage, fp32 GEMMs of 16+ rows)."""
    return "native" if _NATIVE_BF16 else "upcast"


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for a plain (non-FP8) weight, with the CPU bf16 policy above. Both policies
    accumulate in fp32 and round the output to bf16 once; they differ in speed, and in the last
    bit where a kernel's summation order differs (tests/test_cpu_bf16.py bounds both)."""
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() == x.shape[-1]):
        # one row (a decode step), either policy: a memory-bound GEMV, torch.mv at ~1.3x F.linear's
        # one-row GEMM (the fused decode step, dsv3lab/fast/, has its own C GEMV)
        return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    if (x.dtype == torch.bfloat16 and not _NATIVE_BF16 and x.device.type == "cpu"
            and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]):
        # bf16 storage, fp32 arithmetic: on CPUs without bf16 units a compute-bound GEMM
        # runs ~2x faster upcast than through the emulated bf16 path (bench engine)
        return F.linear(x.float(), w.float()).to(torch.bfloat16)
    return F.linear(x, w)


class Linear(nn.Module):
    """y = x @ W.T without bias. ``weight`` may be FP8 (e4m3) with a block ``weight_scale_inv``.

    FP8 weights (``load(fp8="keep"|"quantize")``) compute through ``dsv3lab.fp8.fp8_linear``:
    an FP8 kernel where ``dsv3lab.kernels.backend.fp8_linear`` takes the call, else blocks
    dequantized a band at a time. ``load(fp8="dequant")`` (the default) dequantizes once instead.
    """

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        # fp32 [ceil(out/b), ceil(in/b)] when weight is e4m3 (load(fp8="keep")); None otherwise
        self.register_buffer("weight_scale_inv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            from dsv3lab.fp8 import fp8_linear
            return fp8_linear(x, self.weight, self.weight_scale_inv)
        return linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


def is_plain_linear(lin, dtype: torch.dtype) -> bool:
    """A plain ``Linear`` (not a subclass, not a parallel shard) with a contiguous ``dtype``
    weight on the CPU: what the CPU decode kernels read in place."""
    if type(lin) is not Linear:
        return False
    w = lin.weight
    return w.dtype == dtype and w.is_contiguous() and w.device.type == "cpu"


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). gate = w1, up = w3, down = w2 in the official names."""

    def __init__(self, dim: int, inter: int, dtype=None, device=None):
        super().__init__()
        self.gate_proj = Linear(dim, inter, dtype, device)
        self.up_proj = Linear(dim, inter, dtype, device)
        self.down_proj = Linear(inter, dim, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in fp32 and cast back (the V3.2 indexer's k_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)
