"""MXFP4, the format of DeepSeek-V4's routed experts (``expert_dtype: fp4``).

Each run of 32 consecutive values of a row shares one UE8M0 scale (a bare power of two, 2^e);
each value is FP4 e2m1: a sign and one of 0, 0.5, 1, 1.5, 2, 3, 4, 6. Two values are packed per
byte, the even column in the low nibble (the OCP MX layout, as vLLM unpacks it; the release's
nibble order is unverified here). A weight [M, N] is stored as uint8 [M, N/2] plus a scale
[M, N/32] (fp32 powers of two, or ``float8_e8m0fnu`` exponents).

Quantization picks the smallest power of two with amax / scale <= 6 (no value clips), then rounds
each value to the nearest e2m1 point (ties to the even code). The relative error of one value is
then at most 1/4 of its binade (e2m1 has one mantissa bit); tests/test_v4_formats.py measures it.
"""

from __future__ import annotations

import torch

BLOCK = 32
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_MAX = 6.0


def mxfp4_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [M, N] (N % 32 == 0) -> packed uint8 [M, N/2], fp32 power-of-two scales [M, N/32]."""
    M, N = w.shape
    if N % block:
        raise ValueError(f"mxfp4_quant: {N} columns is not a multiple of {block}")
    x = w.float().view(M, N // block, block)
    amax = x.abs().amax(-1).clamp_min(2.0 ** -126)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP4_MAX)))
    y = (x / scale[..., None]).clamp(-FP4_MAX, FP4_MAX)
    mag = y.abs()
    # nearest grid point, ties to the even code
    d = (mag[..., None] - E2M1).abs()
    code = d.argmin(-1)
    tie = (d.topk(2, dim=-1, largest=False).values.diff(dim=-1).squeeze(-1) == 0) & (code % 2 == 1)
    code = torch.where(tie, code + 1, code).clamp(max=7)
    code = code | ((y < 0).long() << 3)
    code = code.view(M, N).to(torch.uint8)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed.contiguous(), scale


def mxfp4_dequant(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int],
                  dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """packed [M, N/2] (uint8 or int8), scale [M, N/32] -> dtype [M, N]."""
    M, N = shape
    p = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).view(M, N).long()
    vals = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    s = scale.float().repeat_interleave(block, dim=1)[:, :N]
    return (vals * s).to(dtype)


def is_packed_fp4(t: torch.Tensor, shape: tuple) -> bool:
    """Whether ``t`` is the packed MXFP4 form of a weight of ``shape``."""
    return (t.dtype in (torch.uint8, torch.int8) and len(shape) == 2 and t.dim() == 2
            and tuple(t.shape) == (shape[0], shape[1] // 2))
