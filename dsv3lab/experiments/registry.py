"""Which experiments exist: the registry of experiment modules, and importing one by name.

Every registered experiment is listed, importable or not: one whose module (or a module it needs)
is missing is reported as unavailable with the missing module's name, never left out in silence.

An experiment module needs NAME, TITLE, PAPER, ARMS, config(quick) -> dict, scale(cfg) -> str and
run_arm(cfg, arm, seed) -> {"metrics": {..}, "series": {..}}; optional: derive(cfg, seed, by_arm)
-> the same shape, SEEDED = False (deterministic: run once, seeds []), figures(result).
"""

from __future__ import annotations

import importlib

# name -> module
REGISTRY: dict[str, str] = {
    "balancing": "dsv3lab.experiments.balancing",
    "mtp": "dsv3lab.experiments.mtp",
    "fp8_training": "dsv3lab.experiments.fp8_training",
    "pipeline": "dsv3lab.experiments.pipeline",
}


class ExperimentUnavailable(ImportError):
    """A registered experiment whose module cannot be imported because a module is missing."""


def names() -> list[str]:
    """Every registered experiment, in registry order (``unavailable()`` says which cannot run here)."""
    return list(REGISTRY)


def module(name: str):
    """The module of experiment ``name``; ValueError for a name not registered,
    ExperimentUnavailable (naming the missing module) for one that cannot be imported."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(REGISTRY)}")
    try:
        return importlib.import_module(REGISTRY[name])
    except ModuleNotFoundError as e:
        raise ExperimentUnavailable(f"experiment {name!r} ({REGISTRY[name]}) is unavailable: "
                                    f"missing module {e.name!r}", name=e.name) from e


def unavailable() -> dict[str, str]:
    """{name: "missing module X"} for each registered experiment that cannot be imported here."""
    out = {}
    for name in REGISTRY:
        try:
            module(name)
        except ExperimentUnavailable as e:
            out[name] = f"missing module {e.name}"
    return out
