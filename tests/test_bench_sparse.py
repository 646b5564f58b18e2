"""`dsv3lab bench sparse` runs end to end at toy sizes (a smoke test, not a timing test)."""

import json


def test_bench_sparse_tiny(tmp_path):
    from dsv3lab.cli import main
    out = tmp_path / "bench.json"
    rc = main(["bench", "sparse", "--preset", "tiny", "--contexts", "64,128", "--index-topk", "8",
               "--index-heads", "2", "--index-dim", "16", "--rounds", "2", "--steps", "1",
               "--dtype", "float32", "--threads", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["context"] for r in res["rows"]] == [64, 128]
    for r in res["rows"]:
        assert r["dense_tok_s"] > 0 and r["sparse_tok_s"] > 0
        assert len(r["dense_s"]) == len(r["sparse_s"]) == 2
        # the cost model's view: sparse reads 8 latent rows + all indexer keys, dense every row
        assert r["attn_MB_sparse"] < r["attn_MB_dense"]
    assert set(res["fit"]) == {"dense", "sparse", "sparse_fixed_above_dense_ms"}


def test_cost_fit_recovers_a_line():
    from dsv3lab.bench.sparse import cost_fit
    # dense 20 ms + 1.5 ms per 1K tokens, sparse 30 ms + 0.25 ms per 1K tokens, exactly
    rows = [dict(context=c, dense_tok_s=1e3 / (20 + 1.5 * c / 1024), sparse_tok_s=1e3 / (30 + 0.25 * c / 1024))
            for c in (8192, 16384, 32768)]
    fit = cost_fit(rows)
    assert abs(fit["dense"]["fixed_ms"] - 20) < 1e-9 and abs(fit["dense"]["per_1k_ms"] - 1.5) < 1e-9
    assert abs(fit["sparse"]["fixed_ms"] - 30) < 1e-9 and abs(fit["sparse"]["per_1k_ms"] - 0.25) < 1e-9
    assert abs(fit["sparse_fixed_above_dense_ms"] - 10) < 1e-9
    assert cost_fit(rows[:1]) is None


def test_time_decode_names_a_cache_without_room():
    import pytest
    import torch

    from dsv3lab.bench.sparse import bench_model, decode_room, filled_cache, time_decode
    m = bench_model("tiny", [32], index_topk=8, index_heads=2, index_dim=16, dtype=torch.float32, layers=1)
    with pytest.raises(ValueError, match="decode 12 tokens after the 32 cached, but the cache holds 33"):
        time_decode(m, filled_cache(m, 32, room=1), 32, rounds=2, steps=1)
    t = time_decode(m, filled_cache(m, 32, room=decode_room(2, 1)), 32, rounds=2, steps=1)
    assert len(t["all"]["dense"]) == len(t["all"]["sparse"]) == 2
