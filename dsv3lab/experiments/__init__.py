"""The report's experiments, re-run at lab scale, with seeds and spreads, recorded as JSON.

    from dsv3lab import experiments
    experiments.names()                           # ["balancing", "mtp", "fp8_training", ...]
    experiments.unavailable()                     # {name: "missing module X"} for any that cannot run here
    res = experiments.run("balancing", quick=True)          # run now (quick: CI scale, not recorded)
    res = experiments.run("balancing")                      # full scale, written to data/results/
    res = experiments.load_result("balancing")              # the recorded run, or None
    experiments.metric(res, "aux_free_g3e-3.maxvio_global") # its mean over seeds
    print(experiments.table(res, ["val_loss", "maxvio_global"]))   # arms x metrics, mean ± std
    dsv3lab experiment balancing [--quick] [--seeds 0,1,2]  # the same from the shell

One module per concern; this package re-exports them:

  registry     the experiments by name, importing one (``ExperimentUnavailable`` names a missing module)
  runner       ``run``: every (seed, arm) pair with the same seeds for every arm, recorded
  aggregate    per-seed numbers into mean and spread (``spread``), once, for all
  provenance   the commit the code came from, and whether it was dirty
  results      where results live, the result schema, ``save_result`` / ``load_result``
  tables       ``metric``, ``table`` (text), ``table_rows`` (numbers for a notebook's table)
  plots        ``figures(name)`` and the figures shared by experiments
  cli          ``dsv3lab experiment NAME | list``

The experiments themselves: ``balancing``, ``mtp``, ``fp8_training``, ``pipeline`` (with
``training``, the lab-scale training they share, and their own figures in ``*_plots``).
"""

from __future__ import annotations

from dsv3lab.experiments.aggregate import spread
from dsv3lab.experiments.plots import figures
from dsv3lab.experiments.provenance import provenance
from dsv3lab.experiments.registry import REGISTRY, ExperimentUnavailable, module, names, unavailable
from dsv3lab.experiments.results import load_result, result_path, results_dir, save_result
from dsv3lab.experiments.runner import DEFAULT_SEEDS, run
from dsv3lab.experiments.tables import metric, table, table_rows

__all__ = ["REGISTRY", "DEFAULT_SEEDS", "ExperimentUnavailable", "results_dir", "result_path", "names",
           "unavailable", "module", "provenance", "spread", "run", "save_result", "load_result", "metric",
           "table", "table_rows", "figures"]
