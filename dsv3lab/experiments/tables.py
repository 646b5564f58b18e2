"""A result's numbers read out: one metric, or arms x metrics as text (``table``) or as rows of
numbers for a notebook's HTML table (``table_rows``)."""

from __future__ import annotations

from typing import Optional, Sequence


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
    """A plain-text table (the lab's one formatter, ``dsv3lab.viz.tables.text_table``), one row per
    arm, one column per metric, cells "mean ± std" over the seeds (the metric ``<arm>.<metric>``;
    "-" where an arm has none)."""
    from dsv3lab.viz.tables import text_table      # (matplotlib comes with dsv3lab.viz: only when asked)
    rows = []
    for r in table_rows(result, metrics, arms):
        row = {"arm": r["arm"]}
        for m in metrics:
            row[m] = "-" if r[m] is None else f"{r[m]:.{digits}f} ± {r[f'{m} ±']:.{digits}f}"
        rows.append(row)
    n = len(result["seeds"])
    return (text_table(rows, ["arm", *metrics], align={m: "right" for m in metrics})
            + f"\n(mean ± std over {n} seed{'s' * (n != 1)})")


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
