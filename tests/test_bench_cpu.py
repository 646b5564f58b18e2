"""`dsv3lab bench cpu` runs end to end at toy sizes (a smoke test, not a timing test)."""

import json

import pytest

from dsv3lab.kernels import cpu_decode


@pytest.mark.skipif(not cpu_decode.available(), reason="no C compiler for the CPU decode kernels")
def test_bench_cpu_tiny(tmp_path, monkeypatch):
    from dsv3lab.bench import cpu
    from dsv3lab.cli import main
    from dsv3lab.kernels import cpu_compile, cpu_calibrate
    monkeypatch.setattr(cpu, "STREAM_BYTES", 1 << 16)
    # the bench re-times the kernels and stores the verdicts beside the library: a scratch cache
    monkeypatch.setattr(cpu_calibrate, "STREAM_BYTES", 1 << 16)
    monkeypatch.setenv("DSV3LAB_CACHE", str(tmp_path / "cache"))
    for f in (cpu_compile._compile_library, cpu_decode._library, cpu_calibrate._verdicts):
        f.cache_clear()
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
        assert r["C_GB_s"] > 0 and r["ratio"] > 0
    assert res["limits"]["copy_GB_s"] > 0 and len(res["limits"]["rounds"]) == 3
    # the verdicts the engine obeys, timed in the run, and each row's use of them
    assert set(res["calibration"]) == {cpu_calibrate.key(k, d) for k, ds in cpu_calibrate.KERNELS.items() for d in ds}
    assert {r["used"] for r in res["rows"]} <= {"C", "torch"}
    assert res["slower_in_use"] == [r["what"] for r in res["rows"] if r["used"] == "C" and r["ratio"] < 1]
    for f in (cpu_compile._compile_library, cpu_decode._library, cpu_calibrate._verdicts):
        f.cache_clear()
