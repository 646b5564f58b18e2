"""The FP8 block-scale grid: how many ``weight_scale_inv`` entries a weight has, and the check
that names a wrong one. Here, below both the Triton kernels (``quant.py``) and the torch
reference (``dsv3lab/fp8.py``, which re-exports these names), so that neither imports the other.
"""

from __future__ import annotations

import math


def scale_grid(M: int, N: int, b: int = 128, offset: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """The weight_scale_inv shape covering a [M, N] weight (or window starting ``offset`` into
    its first block) in b x b blocks: [ceil((r + M)/b), ceil((c + N)/b)]."""
    r, c = offset
    return math.ceil((r + M) / b), math.ceil((c + N) / b)


def check_scale_shape(M: int, N: int, scale_inv, b: int = 128, who: str = "",
                      offset: tuple[int, int] = (0, 0)) -> None:
    """A [M, N] weight in b x b blocks needs a [ceil(M/b), ceil(N/b)] weight_scale_inv.
    ``scale_inv`` may be a tensor or its shape (the loader checks headers before reading)."""
    want = scale_grid(M, N, b, offset)
    got = tuple(scale_inv.shape) if hasattr(scale_inv, "shape") else tuple(scale_inv)
    if got != want:
        raise ValueError(f"{who}weight_scale_inv has shape {list(got)}; a [{M}, {N}] weight "
                         f"in {b}x{b} blocks needs {list(want)}")
