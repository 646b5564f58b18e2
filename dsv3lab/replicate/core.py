"""Rows, tolerances and the one status rule of the replication table.

A row is one checkable claim:

  id       stable snake_case name (tests, notebooks and JSON consumers key on it)
  kind     derived      the lab's code computes it from a config and the formulas in the code
           measured     a run of the lab's code (an experiment, a simulation), at a stated scale
           consistency  the paper's own printed inputs combined and checked against the paper's
                        own printed result: a check of the paper, not a result of the lab
  section  where the claim is (report section / table)
  claim    what the paper says, in words
  paper    the paper's figure: a number, a [lo, hi] range, a list, or None when it prints none
  lab      the number (or list) the lab produced; None only when it could not be produced
  unit     of both
  tol      the tolerance, stated with the claim (see ``printed``), with its reason in ``why``
  status   ``status(lab, paper, tol)``, always computed, never typed:
             match        within the tolerance
             close        outside it, but within its ``close`` band (one unit of the last printed
                          digit: what a truncated instead of rounded print would give)
             differs      outside both
             unreported   the lab has a number but the paper prints none to compare with
             unavailable  the lab has no number (``note`` says why: not recorded, not importable)
  method   how the lab number was obtained (function, formula, scale)
  note     anything a reader needs beside the number (the reason for a gap)
  spread   measured rows: {"std", "min", "max", "n", "per_seed"} over seeds

Tolerances come from what the paper prints. ``printed(d)`` is the rule for a rounded figure with
``d`` decimals (negative d: tens, hundreds): match within half a unit of the last printed digit,
close within one unit. Bounds ("below 0.25%") and ranges ("85-90%") compare against the bound.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

KINDS = ("derived", "measured", "consistency")
STATUSES = ("match", "close", "differs", "unreported", "unavailable")
FIELDS = ("id", "kind", "section", "claim", "paper", "lab", "unit", "tol", "status", "method", "note")

# --- tolerances --------------------------------------------------------------------------------


def printed(decimals: int, why: str = "") -> dict:
    """The tolerance of a figure the paper rounds to ``decimals`` decimal places."""
    unit = 10.0 ** -decimals
    return dict(kind="abs", value=0.5 * unit, close=unit,
                why=why or (f"printed to {decimals} decimal(s): +-{0.5 * unit:g} is rounding"
                            if decimals > 0 else f"printed to the nearest {unit:g}: +-{0.5 * unit:g} is rounding"))


def exact(why: str = "an integer count (or a list of them): nothing is rounded") -> dict:
    return dict(kind="exact", why=why)


def upper(value: Optional[float] = None, why: str = "") -> dict:
    """Match when lab <= value (default: the paper's figure, which is a bound)."""
    return dict(kind="upper", value=value, why=why or "the paper states an upper bound")


def lower(value: Optional[float] = None, why: str = "") -> dict:
    """Match when lab >= value (default: the paper's figure)."""
    return dict(kind="lower", value=value, why=why or "the paper states a lower bound")


def within(why: str = "") -> dict:
    """Match when lo <= lab <= hi for the paper's [lo, hi]."""
    return dict(kind="range", why=why or "the paper states a range")


def absolute(value: float, why: str, close: Optional[float] = None) -> dict:
    """An explicit absolute band (e.g. propagated from the rounding of the inputs); ``why`` required."""
    if not why:
        raise ValueError("an explicit tolerance needs its reason (why)")
    return dict(kind="abs", value=float(value), close=close, why=why)


_EPS = 1e-9      # relative slack for binary floating point at the band edges (0.5625 vs 0.563)


def status(lab, paper, tol: dict) -> str:
    """The status of a row from its lab value, paper value and tolerance (see the module doc)."""
    if lab is None:
        return "unavailable"
    if paper is None:
        return "unreported"
    kind = tol["kind"]
    if kind == "exact":
        return "match" if _plain(lab) == _plain(paper) else "differs"
    if isinstance(lab, (list, tuple)):
        raise ValueError(f"a list lab value needs an exact tolerance, got {kind!r}")
    lab = float(lab)
    if not math.isfinite(lab):
        raise ValueError(f"lab value is not finite: {lab}")
    if kind == "abs":
        dev = abs(lab - float(paper))
        slack = _EPS * max(1.0, abs(float(paper)))
        if dev <= tol["value"] + slack:
            return "match"
        if tol.get("close") is not None and dev <= tol["close"] + slack:
            return "close"
        return "differs"
    if kind == "upper":
        bound = float(paper if tol.get("value") is None else tol["value"])
        return "match" if lab <= bound else "differs"
    if kind == "lower":
        bound = float(paper if tol.get("value") is None else tol["value"])
        return "match" if lab >= bound else "differs"
    if kind == "range":
        lo, hi = (float(v) for v in paper)
        return "match" if lo <= lab <= hi else "differs"
    raise ValueError(f"unknown tolerance kind {kind!r}")


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# --- rows ----------------------------------------------------------------------------------------


def row(id: str, kind: str, claim: str, paper, lab, unit: str, tol: dict, method: str, note: str = "",
        spread: Optional[dict] = None) -> dict:
    if kind not in KINDS:
        raise ValueError(f"row {id!r}: kind must be one of {KINDS}, got {kind!r}")
    if not id.isidentifier() or id != id.lower():
        raise ValueError(f"row id must be snake_case, got {id!r}")
    if isinstance(lab, str):
        raise ValueError(f"row {id!r}: a lab value is a number or a list, not text ({lab!r})")
    r = dict(id=id, kind=kind, section="", claim=claim, paper=paper, lab=lab, unit=unit, tol=tol,
             status=status(lab, paper, tol), method=method, note=note)
    if spread is not None:
        r["spread"] = spread
    return r


class Unavailable(Exception):
    """A claim's instrument or recorded result is missing; its rows carry the reason, no number."""


# --- the registry ----------------------------------------------------------------------------------

# name -> (section, function(quick) -> rows). Registration order is the table's order.
CLAIMS: dict[str, tuple[str, Callable[[bool], list[dict]]]] = {}


def claim(name: str, section: str):
    def deco(fn):
        CLAIMS[name] = (section, fn)
        fn.claim_name = name
        return fn
    return deco
