"""@triton.jit helpers shared by the kernels: exact rounding to e4m3 / bf16, UE8M0 scales.

Why round by hand: see ``_common``. Each helper returns an fp32 value the target format holds
exactly, so the cast that follows (``.to(tl.float8e4nv)``, ``.to(tl.bfloat16)``) never rounds.
"""

import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """fp32 (|x| <= 448) -> fp32 holding the e4m3 round-to-nearest-even of x, sign kept.

    e4m3 has 3 mantissa bits; normals start at 2^-6 and subnormals step by 2^-9, so the spacing
    at |x| is 2^(max(e, -6) - 3) with e = floor(log2 |x|) read from the fp32 exponent bits.
    Scaling by a power of two is exact, floor() is exact, and the tie rule (to even) is decided
    on the exact fraction.
    """
    bits = x.to(tl.int32, bitcast=True)
    sign = bits & -2147483648                           # 0x80000000
    ax = tl.abs(x)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    y = ax * inv_ulp                                    # exact, in [0, 16)
    r = tl.floor(y)
    f = y - r
    odd = (r.to(tl.int32) & 1) == 1
    r = tl.where((f > 0.5) | ((f == 0.5) & odd), r + 1.0, r)
    q = r * ulp
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def round_to_bf16(x):
    """fp32 -> fp32 holding the bf16 round-to-nearest-even of x (finite x)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = bits & -65536                                # 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def pow2_ceil(s):
    """Smallest power of two >= s, for positive normal fp32 s (UE8M0 scales), from the bits."""
    bits = s.to(tl.int32, bitcast=True)
    expo = bits & 0x7F800000
    expo = tl.where((bits & 0x007FFFFF) != 0, expo + 0x00800000, expo)
    return expo.to(tl.float32, bitcast=True)


@triton.jit
def store_rounded(ptr, x, mask):
    """Store fp32 x into a bf16/fp16/fp32 buffer, rounding to nearest-even first for bf16."""
    if ptr.dtype.element_ty == tl.bfloat16:
        x = round_to_bf16(x)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)
