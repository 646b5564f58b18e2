"""Measured rows: numbers read from an experiment's result (recorded, or a quick run now).

Without ``quick`` a measured row reads ``data/results/<name>.json`` (``dsv3lab.experiments.
load_result``) and says "not recorded" when it is absent; with ``quick`` the experiment runs now at
its smallest scale (``experiments.run(name, quick=True)``, not recorded), once per process.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

from dsv3lab.paths import repo_relative
from dsv3lab.replicate.core import Unavailable, row


QUICK_SEEDS = (0,)      # the smallest scale: one seed (the recorded runs have three)


@functools.lru_cache(maxsize=None)
def _quick_run(name: str) -> dict:
    from dsv3lab import experiments
    return experiments.run(name, quick=True, seeds=QUICK_SEEDS, progress=False)


def experiment_result(name: str, quick: bool) -> dict:
    """The result dict of experiment ``name``; raises Unavailable with the reason."""
    try:
        from dsv3lab import experiments
        experiments.module(name)
    except (ImportError, ValueError) as e:
        raise Unavailable(f"experiment {name!r} is not available: {e}") from None
    if quick:
        return _quick_run(name)
    res = experiments.load_result(name)
    if res is None:
        path = repo_relative(experiments.result_path(name))
        raise Unavailable(f"not recorded: run `python -m dsv3lab experiment {name}` (writes {path})")
    return res


def _scale(res: dict) -> str:
    seeds = res.get("seeds") or []
    s = res.get("scale") or ""
    return (f"{s}; seeds {seeds}" if seeds else s) + (" [quick run]" if res.get("quick") else "")


def metric_row(id: str, claim: str, paper, unit: str, tol: dict, experiment: str, key: str, quick: bool,
               method: str, note: str = "", transform: Optional[Callable[[dict], float]] = None) -> dict:
    """A measured row whose lab value is the seed mean of ``metrics[key]`` in ``experiment``'s
    result (or ``transform(result)`` when given). Missing result or metric -> lab None, with why."""
    try:
        res = experiment_result(experiment, quick)
    except Unavailable as e:
        return row(id, "measured", claim, paper, None, unit, tol, method, note=str(e))
    spread = None
    try:
        if transform is not None:
            lab = transform(res)
        else:
            m = res["metrics"][key]
            lab = m["mean"]
            spread = {k: m[k] for k in ("std", "min", "max", "n", "per_seed") if k in m}
    except KeyError as e:
        return row(id, "measured", claim, paper, None, unit, tol, method,
                   note=f"the {experiment!r} result has no metric {e}; metrics: {sorted(res.get('metrics', {}))}")
    full = f"{method} -- {_scale(res)} (commit {(res.get('commit') or '?')[:10]})"
    return row(id, "measured", claim, paper, lab, unit, tol, full, note=note, spread=spread)
