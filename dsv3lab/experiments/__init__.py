"""The report's experiments, re-run at lab scale, with seeds and spreads, recorded as JSON.

    from dsv3lab import experiments
    experiments.names()                           # ["balancing", "mtp", "fp8_training", ...]
    res = experiments.run("balancing", quick=True)          # run now (quick: CI scale, not recorded)
    res = experiments.run("balancing")                      # full scale, written to data/results/
    res = experiments.load_result("balancing")              # the recorded run, or None
    experiments.metric(res, "aux_free_g3e-3.maxvio_global") # its mean over seeds
    print(experiments.table(res, ["val_loss", "maxvio_global"]))   # arms x metrics, mean ± std
    dsv3lab experiment balancing [--quick] [--seeds 0,1,2]  # the same from the shell

An experiment is a module with one function per arm (``run_arm``). ``run`` calls it for every
(seed, arm) pair, the SAME seeds for every arm, so the arms differ only in what the arm changes;
``derive`` (optional) computes what needs several arms of one seed (a relative error against a
baseline arm). Per-seed numbers are aggregated into mean and spread here, once, for all.

Result schema (``data/results/<name>.json``, written atomically):

    {
      "name":     "balancing",
      "title":    one line: what is compared,
      "paper":    the paper's figure(s) this re-measures, with section / table,
      "arms":     ["aux_free", "seq_aux", ...],
      "config":   the experiment's settings (preset, steps, batch, seq_len, lr, ...; JSON values),
      "scale":    one line a reader can quote beside a number ("tiny preset, 0.5 M params, ..."),
      "quick":    bool (the CI scale),
      "seeds":    [0, 1, 2]   ([] for a deterministic experiment, run once),
      "command":  the command line that reproduces the file,
      "commit":   `git rev-parse HEAD` of the code that produced it (null outside a git checkout),
      "dirty":    true when dsv3lab/ or kernels/ had uncommitted changes when the run started,
      "created":  ISO-8601 UTC time,
      "wall_s":   seconds the whole run took,
      "metrics":  {"<arm>.<metric>" or "<metric>": {"per_seed": [..], "mean": x, "std": s,
                   "min": a, "max": b, "n": N}},    std is the sample std (ddof 1; 0 when N = 1)
      "series":   {"<arm>.<series>": {"per_seed": [[..], ..], "mean": [..]}}   curves over steps
                   (figures draw the mean with a min-max band over seeds)
    }

Where results live: ``data/results/`` beside the package (``DSV3LAB_RESULTS`` overrides).
Quick runs are returned, not recorded, unless ``record=True``: the committed files are the
full-scale runs, and tests must not rewrite them.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Iterable, Optional, Sequence

from dsv3lab.atomic import write_bytes_atomic

# name -> module. A module needs NAME, TITLE, PAPER, ARMS, config(quick) -> dict, scale(cfg) -> str
# and run_arm(cfg, arm, seed) -> {"metrics": {..}, "series": {..}}; optional: derive(cfg, seed,
# by_arm) -> same shape, SEEDED = False (deterministic: run once, seeds []), figures(result).
REGISTRY: dict[str, str] = {
    "balancing": "dsv3lab.experiments.balancing",
    "mtp": "dsv3lab.experiments.mtp",
    "fp8_training": "dsv3lab.experiments.fp8_training",
    "pipeline": "dsv3lab.experiments.pipeline",
}

DEFAULT_SEEDS = (0, 1, 2)

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def results_dir() -> str:
    return os.environ.get("DSV3LAB_RESULTS") or os.path.join(_REPO, "data", "results")


def result_path(name: str, out_dir: Optional[str] = None) -> str:
    return os.path.join(out_dir or results_dir(), f"{name}.json")


def names() -> list[str]:
    """Experiments whose module is present (another area may not have landed yet)."""
    out = []
    for name in REGISTRY:
        try:
            module(name)
        except ModuleNotFoundError:
            continue
        out.append(name)
    return out


def module(name: str):
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """The commit the code came from and whether the code (dsv3lab/, kernels/) differed from it."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "dsv3lab", "kernels") if commit else None
    return dict(commit=commit, dirty=bool(status) if status is not None else None)


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


def _series_spread(curves: Sequence[Sequence]) -> dict:
    curves = [list(c) for c in curves]
    out = dict(per_seed=curves)
    if all(isinstance(x, (int, float)) for c in curves for x in c):
        n = min(len(c) for c in curves)
        out["mean"] = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
    return out


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
    """Run experiment ``name`` over ``seeds`` x its arms and return the result dict (schema above).
    ``record`` (default: not quick) writes it to ``data/results/<name>.json`` atomically.
    ``overrides`` replace entries of the experiment's config; a dict is merged into a dict entry
    (``train=dict(steps=40)`` changes the step count only). ``arms`` runs a subset of the arms
    (a live demo); cross-arm metrics (``derive``) then need their arms present."""
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
        series={k: _series_spread(v) for k, v in acc["series"].items()},
        python=sys.version.split()[0])
    if record if record is not None else not quick:
        save_result(result, out_dir)
    return result


def save_result(result: dict, out_dir: Optional[str] = None) -> str:
    path = result_path(result["name"], out_dir)
    write_bytes_atomic(path, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
    return path


def load_result(name: str, out_dir: Optional[str] = None) -> Optional[dict]:
    """The recorded result of ``name`` (schema above), or None when it was never recorded."""
    path = result_path(name, out_dir)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            res = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("name", "config", "seeds", "command", "commit", "metrics"):
        if key not in res:
            raise ValueError(f"{path}: result has no {key!r} field")
    return res


def metric(result: dict, key: str, stat: str = "mean"):
    """``result["metrics"][key][stat]`` with an error naming the experiment and the known keys."""
    try:
        m = result["metrics"][key]
    except KeyError:
        raise KeyError(f"experiment {result.get('name')!r} has no metric {key!r}; "
                       f"metrics: {sorted(result.get('metrics', {}))}") from None
    return m[stat]


def table(result: dict, metrics: Sequence[str], arms: Optional[Sequence[str]] = None,
          digits: int = 3) -> str:
    """A plain-text table, one row per arm, one column per metric, cells "mean ± std" over the
    seeds (the metric ``<arm>.<metric>``; "-" where an arm has none)."""
    arms = list(arms or result["arms"])
    head = ["arm"] + list(metrics)
    rows = []
    for arm in arms:
        cells = [arm]
        for m in metrics:
            v = result["metrics"].get(f"{arm}.{m}")
            cells.append("-" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    n = len(result["seeds"])
    return "\n".join([line(head)] + [line(r) for r in rows] + [f"(mean ± std over {n} seed{'s' * (n != 1)})"])


def table_rows(result: dict, metrics: Sequence[str], arms: Optional[Sequence[str]] = None) -> list[dict]:
    """The rows of ``table`` as numbers for ``dsv3lab.viz.tables.html_table``: one dict per arm,
    ``<metric>`` the mean over the seeds and ``<metric> ±`` their std (None where an arm has none)."""
    rows = []
    for arm in list(arms or result["arms"]):
        row = {"arm": arm}
        for m in metrics:
            v = result["metrics"].get(f"{arm}.{m}")
            row[m], row[f"{m} ±"] = (None, None) if v is None else (float(v["mean"]), float(v["std"]))
        rows.append(row)
    return rows


def figures(name: str, result: Optional[dict] = None) -> dict:
    """{title: matplotlib Figure} of a result (the recorded one by default)."""
    mod = module(name)
    result = result if result is not None else load_result(name)
    if result is None:
        raise FileNotFoundError(f"no recorded result for {name!r} at {result_path(name)}; "
                                f"run `python -m dsv3lab experiment {name}`")
    return mod.figures(result) if hasattr(mod, "figures") else {}


__all__ = ["REGISTRY", "DEFAULT_SEEDS", "results_dir", "result_path", "names", "module", "provenance",
           "spread", "run", "save_result", "load_result", "metric", "table", "table_rows", "figures"]
