"""Per-seed numbers into mean and spread, once, for every experiment."""

from __future__ import annotations

import math
from typing import Sequence


def spread(values: Sequence[float]) -> dict:
    """per-seed values -> {"per_seed", "mean", "std" (ddof 1), "min", "max", "n"}. NaN is an error:
    a run that diverged must say so, not average into a number."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no values to aggregate")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non-finite metric values at seed positions {bad}: {vals}")
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return dict(per_seed=vals, mean=mean, std=std, min=min(vals), max=max(vals), n=n)


def series_spread(curves: Sequence[Sequence]) -> dict:
    """per-seed curves -> {"per_seed", "mean"} (the mean over seeds, step by step, to the shortest
    curve; only for numeric curves)."""
    curves = [list(c) for c in curves]
    out = dict(per_seed=curves)
    if all(isinstance(x, (int, float)) for c in curves for x in c):
        n = min(len(c) for c in curves)
        out["mean"] = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
    return out
