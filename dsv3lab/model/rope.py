"""Rotary positions with YaRN, in the checkpoint's interleaved pairing.

The released weights rotate channel pairs (2i, 2i+1) of the 64-wide RoPE part as complex numbers
(the official demo's ``view_as_complex``). HF de-interleaves to [evens, odds] and uses
``rotate_half``; the logits agree, the q/k tensors do not. Rotating the halves without that
permutation would be silently wrong, so there is one function here and everything calls it.

YaRN (s = factor, L = original context, d = rope dim, theta = base):
  c(r)   = d * ln(L / (2 pi r)) / (2 ln theta)      correction dim for r rotations
  low    = max(floor(c(beta_fast)), 0), high = min(ceil(c(beta_slow)), d - 1)
  ramp_i = clamp((i - low) / (high - low), 0, 1)
  f'_i   = f_i * (1 - ramp_i) + (f_i / s) * ramp_i
so high-frequency pairs (i <= low) keep their frequency and low-frequency ones are divided by s.
cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim) (1 for V3); the attention
softmax scale carries mscale(s, mscale_all_dim)^2 instead (``ModelConfig.softmax_scale``).
"""

from __future__ import annotations

import math

import torch

from dsv3lab.config import ModelConfig


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [rope_dim/2] (fp32) and the cos/sin amplitude factor."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    y = cfg.yarn
    if y is None:
        return freqs, 1.0
    s, L = y["factor"], y["original_max_position_embeddings"]

    def corr_dim(rot: float) -> float:
        return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(y["beta_fast"])), 0)
    high = min(math.ceil(corr_dim(y["beta_slow"])), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = freqs * (1 - ramp) + (freqs / s) * ramp
    if y["mscale"] and y["mscale_all_dim"]:
        amp = _mscale(s, y["mscale"]) / _mscale(s, y["mscale_all_dim"])
    else:
        amp = _mscale(s)
    return freqs, amp


class RotaryTable:
    """cos/sin [max_len, rope_dim/2] in fp32, grown on demand; not a module (never saved)."""

    def __init__(self, cfg: ModelConfig, device=None):
        self.freqs, self.amp = inv_freq(cfg)
        self.cos = self.sin = None
        self.device = device

    def get(self, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != torch.device(device):
            n = max(end, 256 if self.cos is None else 2 * self.cos.shape[0])
            t = torch.arange(n, dtype=torch.float32)
            ang = torch.outer(t, self.freqs)
            self.cos = (ang.cos() * self.amp).to(device)
            self.sin = (ang.sin() * self.amp).to(device)
        return self.cos[start:end], self.sin[start:end]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., S, (H,) d] by cos/sin [S, d/2]; returns x's dtype.

    ``cos``/``sin`` must broadcast against x[..., 0::2]; callers insert the head axis.
    """
    # pairs as complex numbers times cos + i sin: (x0 cos - x1 sin) + i (x1 cos + x0 sin), the
    # same products as written out, in fewer ops (8 instead of 12; it runs twice per layer and step)
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()                  # view_as_complex needs whole (re, im) pairs
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., d] in half-split pairs (i, i + d/2) by cos/sin [S, d/2]; returns x's dtype.

    The lightning indexer of V3.2 (``model/indexer.py``) rotates this way (GPT-NeoX style), not
    interleaved like MLA: same frequencies and positions, a different pairing of channels.
    """
    xf = x.float()
    h = xf.shape[-1] // 2
    x0, x1 = xf[..., :h], xf[..., h:]
    return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).to(x.dtype)
