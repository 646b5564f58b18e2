"""What every benchmark's results file records beside its figures: the command line that made
them, when (UTC), and the commit of the code with whether dsv3lab/ or kernels/ differed from it
(``dsv3lab.experiments.provenance``), so that a figure quoted in docs/performance.md can be traced
to the code that measured it."""

from __future__ import annotations

import datetime
import sys

from dsv3lab.experiments.provenance import provenance


def recorded(results: dict) -> dict:
    """``results`` with a ``"made_by"`` entry: {"command", "utc", "commit", "dirty"}."""
    made_by = dict(command=" ".join(["dsv3lab", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("dsv3lab")
                   else " ".join(sys.argv),
                   utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **provenance())
    return {**results, "made_by": made_by}
