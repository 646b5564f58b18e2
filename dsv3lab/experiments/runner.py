"""Running an experiment: every (seed, arm) pair, the same seeds for every arm, aggregated and recorded.

``run`` calls the experiment's ``run_arm`` for every (seed, arm) pair, the SAME seeds for every
arm, so the arms differ only in what the arm changes; ``derive`` (optional) computes what needs
several arms of one seed (a relative error against a baseline arm). Quick runs are returned, not
recorded, unless ``record=True``: the committed files are the full-scale runs, and tests must not
rewrite them.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Iterable, Optional, Sequence

from dsv3lab.experiments.aggregate import series_spread, spread
from dsv3lab.experiments.provenance import provenance
from dsv3lab.experiments.registry import module
from dsv3lab.experiments.results import save_result

DEFAULT_SEEDS = (0, 1, 2)


def _command(name: str, quick: bool, seeds: Sequence, overrides: Optional[dict] = None) -> str:
    if overrides:          # not expressible on the command line: say it as the Python call
        return (f"python -c \"from dsv3lab import experiments; experiments.run({name!r}, quick={quick}, "
                f"seeds={list(seeds)}, **{overrides!r})\"")
    cmd = f"python -m dsv3lab experiment {name}"
    if quick:
        cmd += " --quick"
    if seeds and tuple(seeds) != DEFAULT_SEEDS:
        cmd += " --seeds " + ",".join(str(s) for s in seeds)
    return cmd


def _merge(dst: dict, src: dict, prefix: str = "") -> None:
    for kind in ("metrics", "series"):
        for k, v in (src.get(kind) or {}).items():
            dst[kind].setdefault(prefix + k, []).append(v)


def run(name: str, quick: bool = False, seeds: Iterable[int] = DEFAULT_SEEDS, record: Optional[bool] = None,
        out_dir: Optional[str] = None, progress: bool = True, arms: Optional[Sequence[str]] = None,
        **overrides) -> dict:
    """Run experiment ``name`` over ``seeds`` x its arms and return the result dict (the schema in
    ``dsv3lab.experiments.results``). ``record`` (default: not quick) writes it to
    ``data/results/<name>.json`` atomically. ``overrides`` replace entries of the experiment's
    config; a dict is merged into a dict entry (``train=dict(steps=40)`` changes the step count
    only). ``arms`` runs a subset of the arms (a live demo); cross-arm metrics (``derive``) then
    need their arms present."""
    mod = module(name)
    cfg = dict(mod.config(quick))
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"experiment {name!r} has no config field(s) {sorted(unknown)}; "
                         f"fields: {sorted(cfg)}")
    for k, v in overrides.items():         # a dict merges into a dict field (train=dict(steps=40))
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg[k], dict) else v
    seeded = getattr(mod, "SEEDED", True)
    seeds = [int(s) for s in seeds] if seeded else []
    if seeded and not seeds:
        raise ValueError(f"experiment {name!r} needs at least one seed")
    if seeded and len(set(seeds)) != len(seeds):
        raise ValueError(f"repeated seeds {seeds}")
    all_arms = list(mod.ARMS(cfg) if callable(mod.ARMS) else mod.ARMS)
    if arms is not None:
        bad = [a for a in arms if a not in all_arms]
        if bad:
            raise ValueError(f"experiment {name!r} has no arm(s) {bad}; arms: {all_arms}")
    arms = list(arms) if arms is not None else all_arms
    prov = provenance()                    # the code as it was when the run started
    t0 = time.perf_counter()
    acc = dict(metrics={}, series={})
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(seeds or [None]) * len(arms), desc=f"experiment {name}", unit="run")
    try:
        for seed in (seeds or [None]):
            by_arm = {}
            for arm in arms:
                if bar is not None:
                    bar.set_postfix(seed=seed, arm=arm)
                by_arm[arm] = mod.run_arm(cfg, arm, seed)
                _merge(acc, by_arm[arm], prefix=f"{arm}.")
                if bar is not None:
                    bar.update(1)
            if hasattr(mod, "derive") and arms == all_arms:
                _merge(acc, mod.derive(cfg, seed, by_arm))
    finally:
        if bar is not None:
            bar.close()
    result = dict(
        name=name, title=mod.TITLE, paper=mod.PAPER, arms=arms, config=cfg, scale=mod.scale(cfg),
        quick=bool(quick), seeds=seeds, command=_command(name, quick, seeds, {**overrides, **({"arms": arms} if arms != all_arms else {})}), **prov,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_s=time.perf_counter() - t0,
        metrics={k: spread(v) for k, v in acc["metrics"].items()},
        series={k: series_spread(v) for k, v in acc["series"].items()},
        python=sys.version.split()[0])
    if record if record is not None else not quick:
        save_result(result, out_dir)
    return result
