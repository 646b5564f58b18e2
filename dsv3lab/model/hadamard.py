"""Fast Walsh-Hadamard transform over the last dimension (orthonormal, Sylvester order).

H_n = [[H, H], [H, -H]] / sqrt(2) built recursively from H_1 = [1]; ``hadamard(x)`` returns x @ H_n
in log2(n) butterfly passes (n log n additions) instead of an n x n matmul. H_n is symmetric and
orthogonal, so hadamard(hadamard(x)) == x and (x H) . (y H) == x . y: the V3.2 indexer rotates its
queries and keys with it before quantizing them to FP8 (see ``model/indexer.py``).
"""

from __future__ import annotations

import torch


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] (n a power of two) -> x @ H_n with H_n orthonormal; computed in fp32 (fp64 for
    fp64 input), returns x's dtype."""
    n = x.shape[-1]
    if n <= 0 or n & (n - 1):
        raise ValueError(f"hadamard: last dimension must be a power of two, got {n}")
    lead = x.shape[:-1]
    y = x if x.dtype == torch.float64 else x.float()
    h = 1
    while h < n:
        # pairs (j, j + h) inside each block of 2h values: (a, b) -> (a + b, a - b)
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) * n ** -0.5).to(x.dtype)
