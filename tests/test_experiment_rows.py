"""``experiments.table_rows``: the recorded result's mean and std as numbers (for html_table),
the same cells ``experiments.table`` prints as text."""

from dsv3lab import experiments


def test_table_rows_numbers_per_arm():
    res = dict(arms=["a", "b"], seeds=[0, 1],
               metrics={"a.loss": dict(mean=2.5, std=0.125), "b.loss": dict(mean=3.0, std=0.0),
                        "a.maxvio": dict(mean=0.75, std=0.25)})
    rows = experiments.table_rows(res, ["loss", "maxvio"])
    assert rows == [dict(arm="a", loss=2.5, **{"loss ±": 0.125}, maxvio=0.75, **{"maxvio ±": 0.25}),
                    dict(arm="b", loss=3.0, **{"loss ±": 0.0}, maxvio=None, **{"maxvio ±": None})]
    assert "2.500 ± 0.125" in experiments.table(res, ["loss", "maxvio"])
    assert [r["arm"] for r in experiments.table_rows(res, ["loss"], arms=["b"])] == ["b"]
