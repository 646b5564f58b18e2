"""`dsv3lab bench parallel` runs, prints its table and writes JSON with measured vs predicted bytes."""

import argparse
import json

from dsv3lab.bench import parallel


def test_bench_parallel_small(tmp_path, capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    parallel.add_args(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--preset", "tiny", "--worlds", "1,2", "--batch", "2", "--prompt-len", "8",
                         "--new-tokens", "2", "--repeat", "1", "--out", str(out)])
    assert parallel.run(args) == 0
    res = json.loads(out.read_text())
    rows = {(r["layout"], r["world"]): r for r in res["rows"]}
    assert set(rows) == {("tp", 1), ("tp", 2), ("dp", 2)}
    assert rows[("tp", 1)]["a2a_B_per_tok_layer"] == 0
    for key in (("tp", 2), ("dp", 2)):
        r = rows[key]
        assert r["tok_per_s"] > 0
        assert 0.5 < r["ratio"] < 1.5          # measured bytes near the planner's uniform-routing figure
    assert "a2a_B_per_tok_layer" in capsys.readouterr().out
