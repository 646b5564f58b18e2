"""Small pieces DeepSeek-V4 adds to the building blocks of ``layers.py``.

- ``RMSNormF32``: V4 keeps every norm weight in fp32 and multiplies in fp32 before casting back
  (V3's RMSNorm casts first, then scales in the model dtype; in fp32 the two are the same).
- ``rms_unit``: RMSNorm without a weight (the per-head query norm, the mHC input norm).
- ``RotaryPair``: V4's two RoPE tables, "main" (``rope_theta``, plain) for sliding-only layers and
  "compress" (``compress_rope_theta`` with YaRN, amplitude 1) for CSA/HCA layers and their
  compressors; cos/sin for any positions.
- ``rope_tail``: interleaved RoPE on the LAST ``qk_rope_head_dim`` channels of a vector (V4
  lays a head out as [nope | rope], V3 as [nope ; rope] in separate tensors).
- ``GroupedLinear``: the first half of the grouped output projection: heads split in
  ``o_groups`` groups, each projected by its own block of one weight [G * o_lora_rank, H*d / G].
- ``ClampedMLP``: SwiGLU with ``gate <= limit`` and ``-limit <= up <= limit`` (``swiglu_limit``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.layers import Linear


class RMSNormF32(nn.Module):
    """RMSNorm whose weight stays fp32: ``(w * x / rms(x)).to(x.dtype)``, all in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (self.weight.float() * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def rms_unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, the factor computed in fp32, the product in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def yarn_inv_freq(d: int, base: float, yarn: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies [d/2]; YaRN blends in ``1/factor`` of the low frequencies
    (same ramp as ``rope.inv_freq``). V4 does not scale cos/sin (transformers sets
    ``attention_factor`` 1 for it), so only the frequencies change."""
    freqs = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if not yarn or yarn["factor"] <= 1:
        return freqs
    s, L = yarn["factor"], yarn["original_max_position_embeddings"]

    def corr_dim(rot: float) -> float:
        return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(yarn["beta_fast"])), 0)
    high = min(math.ceil(corr_dim(yarn["beta_slow"])), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return freqs * (1 - ramp) + (freqs / s) * ramp


class RotaryPair:
    """cos/sin [n, r/2] (fp32) at given positions, for the "main" or the "compress" table."""

    def __init__(self, cfg, device=None):
        r = cfg.qk_rope_head_dim
        self.freqs = {"main": yarn_inv_freq(r, cfg.rope_theta, None),
                      "compress": yarn_inv_freq(r, cfg.compress_rope_theta, cfg.yarn)}

    def at(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.freqs[kind].to(positions.device)
        ang = positions.float()[..., None] * f
        return ang.cos(), ang.sin()


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last 2 * cos.shape[-1] channels of x; cos/sin
    must broadcast against x[..., 0::2] of that slice (insert the head axis at the caller)."""
    r = 2 * cos.shape[-1]
    pe = x[..., -r:].float().unflatten(-1, (-1, 2))
    x0, x1 = pe[..., 0], pe[..., 1]
    rot = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-r], rot], dim=-1) if r < x.shape[-1] else rot


class GroupedLinear(nn.Module):
    """x [..., G, in/G] -> [..., G, out/G]: group g through rows [g*out/G, (g+1)*out/G) of weight."""

    def __init__(self, in_per_group: int, out_features: int, groups: int, dtype=None, device=None):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_features, in_per_group, dtype=dtype, device=device))
        self.register_buffer("weight_scale_inv", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            from dsv3lab.fp8 import weight_dequant
            w = weight_dequant(w, self.weight_scale_inv, 128, x.dtype)
        w = w.view(self.groups, -1, w.shape[-1]).to(x.dtype)                   # [G, out/G, in/G]
        return torch.einsum("...gi,goi->...go", x, w)


class ClampedMLP(nn.Module):
    """SwiGLU with V4's clamp: down(silu(min(gate, L)) * clamp(up, -L, L))."""

    def __init__(self, dim: int, inter: int, limit: float, dtype=None, device=None):
        super().__init__()
        self.limit = limit
        self.gate_proj = Linear(dim, inter, dtype, device)
        self.up_proj = Linear(dim, inter, dtype, device)
        self.down_proj = Linear(inter, dim, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x).clamp(max=self.limit)
        u = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
        return self.down_proj(F.silu(g) * u)
