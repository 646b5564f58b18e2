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
