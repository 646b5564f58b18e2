"""`dsv3lab bench cpu` runs end to end at toy sizes (a smoke test, not a timing test)."""

import json

import pytest

from dsv3lab.kernels import cpu_decode


@pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler for the CPU decode kernels")
def test_bench_cpu_tiny(tmp_path, monkeypatch):
    from dsv3lab.bench import cpu
    from dsv3lab.cli import main
    monkeypatch.setattr(cpu, "STREAM_BYTES", 1 << 16)
    out = tmp_path / "bench.json"
    assert main(["bench", "cpu", "--preset", "tiny", "--contexts", "64", "--rounds", "2", "--reps", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    whats = [r["what"] for r in res["rows"]]
    assert any(w.startswith("gemv lm_head") and w.endswith("bfloat16") for w in whats)
    import dsv3lab
    H = dsv3lab.ModelConfig.preset("tiny").num_attention_heads
    att = {r["what"] for r in res["rows"] if r["what"].startswith("attention")}
    assert att == {f"attention T=64 H={H} float32", f"attention T=64 H={H} bfloat16"}
    for r in res["rows"]:
        assert r["torch_GB_s"] > 0
        if "bfloat16" in r["what"] and r["what"].startswith("attention"):
            assert r["C_GB_s"] != r["C_GB_s"]                 # NaN: bf16 attention stays torch's
        else:
            assert r["C_GB_s"] > 0 and r["ratio"] > 0
    assert res["limits"]["copy_GB_s"] > 0 and len(res["limits"]["rounds"]) == 3
