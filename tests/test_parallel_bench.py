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
    assert set(rows) == {("tp", 1), ("tp", 2), ("dp", 2), ("dp-eplb", 2), ("dp-fp8", 2)}
    assert rows[("tp", 1)]["a2a_B_per_tok_layer"] == 0
    for key in (("tp", 2), ("dp", 2), ("dp-eplb", 2), ("dp-fp8", 2)):
        r = rows[key]
        assert r["tok_per_s"] > 0
        assert 0.5 < r["ratio"] < 1.5          # measured bytes near the planner's uniform-routing figure
    # redundant experts: one more slot per rank, the measured balance near EPLB's prediction
    eplb = rows[("dp-eplb", 2)]
    assert eplb["slots_per_rank"] == rows[("dp", 2)]["slots_per_rank"] + 1
    assert abs(eplb["balance"] - eplb["predicted_balance"]) < 0.1
    # FP8 dispatch: fewer bytes than fp32 rows, a small but non-zero logit error
    fp8 = rows[("dp-fp8", 2)]
    assert fp8["a2a_B_per_tok_layer"] < 0.6 * rows[("dp", 2)]["a2a_B_per_tok_layer"]
    assert 0 < fp8["logit_err"] < 0.1
    assert "a2a_B_per_tok_layer" in capsys.readouterr().out
