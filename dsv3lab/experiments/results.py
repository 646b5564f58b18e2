"""Recorded results: where they live, and writing and reading them (``data/results/<name>.json``).

Result schema (written atomically):

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

Where results live: ``data/results/`` in the checkout (``DSV3LAB_RESULTS`` overrides).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from dsv3lab.atomic import write_bytes_atomic
from dsv3lab.paths import repo_root

REQUIRED = ("name", "config", "seeds", "command", "commit", "metrics")


def results_dir() -> str:
    return os.environ.get("DSV3LAB_RESULTS") or os.path.join(repo_root(), "data", "results")


def result_path(name: str, out_dir: Optional[str] = None) -> str:
    return os.path.join(out_dir or results_dir(), f"{name}.json")


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
    for key in REQUIRED:
        if key not in res:
            raise ValueError(f"{path}: result has no {key!r} field")
    return res
