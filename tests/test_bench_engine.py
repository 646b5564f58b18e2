"""`dsv3lab bench engine` runs end to end on a tiny preset (a smoke test, not a timing test)."""

import json

import pytest

pytest.importorskip("transformers")


def test_bench_engine_tiny(tmp_path):
    from dsv3lab.cli import main
    out = tmp_path / "bench.json"
    rc = main(["bench", "engine", "--preset", "tiny", "--dtypes", "float32", "--prefill", "16",
               "--decode", "16", "--decode-steps", "1", "--repeat", "1", "--rounds", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    rows = {(r["engine"], r["what"]): r for r in res["rows"]}
    for eng in ("dsv3lab", "transformers"):
        assert rows[(eng, "prefill 16")]["value"] > 0 and rows[(eng, "decode @16")]["value"] > 0
    # both engines cache the same latent: equal bytes per token
    assert rows[("dsv3lab", "kv cache")]["value"] == rows[("transformers", "kv cache")]["value"] \
        == 3 * (32 + 8) * 4
    assert rows[("transformers", "prefill 16")]["vs_transformers"] == 1.0
    assert res["limits"]["float32"]["matmul_flops"] > 0
    # two rounds per figure, limits before each round and after the last; median within [lo, hi]
    assert len(res["limits"]["float32"]["rounds"]) == 3
    for r in res["rows"]:
        assert r["rounds"] == (2 if r["unit"] == "tok/s" else 1) and r["lo"] <= r["value"] <= r["hi"]
        assert r["valid"] == (not r["pct_of_limit"] > 100)
