"""dsv3lab.replicate: rows are well formed, the exact-arithmetic claims match, the CLI writes JSON."""

import json
import math

import pytest

from dsv3lab import replicate as R

FAST = ["kv_cache", "cost", "schedule", "yarn", "tpot", "pipeline"]


@pytest.fixture(scope="module")
def rows():
    return R.replicate(FAST)


def by_claim(rows, text):
    hits = [r for r in rows if text in r["claim"]]
    assert hits, text
    return hits[0]


def test_rows_carry_every_field(rows):
    assert {r["name"] for r in rows} == set(FAST)
    for r in rows:
        assert set(R.FIELDS) <= set(r), r
        assert r["status"] in R.STATUSES
        assert r["claim"] and r["section"] and r["method"]
        if r["status"] != "match":
            assert r["note"], r


def test_kv_bytes(rows):
    assert by_claim(rows, "DeepSeek-V3 KV cache")["lab"] == 61 * 576 * 2 == 70272
    assert by_claim(rows, "Qwen-2.5 72B KV cache")["lab"] == 80 * 8 * 128 * 2 * 2 == 327680
    assert by_claim(rows, "LLaMA-3.1 405B KV cache")["lab"] == 126 * 8 * 128 * 2 * 2 == 516096
    for text in ("DeepSeek-V3 KV", "Qwen-2.5 72B KV", "LLaMA-3.1 405B KV", "Qwen-2.5 72B / V3"):
        assert by_claim(rows, text)["status"] == "match"
    llama = by_claim(rows, "LLaMA-3.1 405B / V3")
    assert llama["status"] == "close" and llama["paper"] == 7.28
    assert llama["lab"] == pytest.approx(516096 / 70272, abs=1e-3)


def test_cost_arithmetic(rows):
    assert 2664 + 119 + 5 == 2788
    assert by_claim(rows, "total H800 GPU-hours")["lab"] == 2788
    assert by_claim(rows, "total cost")["lab"] == pytest.approx(2788 * 2 / 1000) == 5.576
    assert by_claim(rows, "180K per trillion")["lab"] == pytest.approx(180 * 14.8)
    assert round(180e3 / 2048 / 24, 1) == 3.7
    for r in rows:
        if r["name"] == "cost":
            assert r["status"] == "match", r


def test_tpot_arithmetic(rows):
    step = 3 * 32 * 9 * 7000 / 50e9
    assert by_claim(rows, "EP step at 50 GB/s (H800")["lab"] == pytest.approx(step * 1e6)
    assert round(step * 1e6, 2) == 120.96
    assert round(step * 2 * 61 * 1e3, 2) == 14.76
    assert by_claim(rows, "TPOT at 50")["status"] == "match"
    assert by_claim(rows, "tokens/s at 50")["lab"] == pytest.approx(1 / (step * 122))
    assert by_claim(rows, "tokens/s at 50")["status"] == "close"       # 67.8 printed as 67
    g = 3 * 32 * 9 * 7000 / 900e9
    assert round(g * 1e6, 2) == 6.72 and round(g * 122 * 1e3, 2) == 0.82
    for text in ("EP step at 900", "TPOT at 900", "tokens/s at 900"):
        assert by_claim(rows, text)["status"] == "match"


def test_softmax_scale_and_yarn(rows):
    m = 0.1 * math.log(40) + 1
    assert by_claim(rows, "softmax scale 192")["lab"] == pytest.approx(192 ** -0.5 * m * m)
    assert round(192 ** -0.5 * m * m, 7) == 0.1352338
    assert by_claim(rows, "ramp low")["lab"] == 10 and by_claim(rows, "ramp high")["lab"] == 23
    assert all(r["status"] == "match" for r in rows if r["name"] == "yarn")


def test_pipeline_simulation():
    for pp, m in ((4, 8), (16, 32), (2, 2)):
        sim = R.simulate_1f1b(pp, m, F=1.0, B=2.0)
        assert sim["bubble"][0] == pytest.approx((pp - 1) * 3.0)


def test_unavailable_rows_carry_no_number(rows, monkeypatch):
    assert all(r["lab"] is None for r in rows if r["status"] == "unavailable")

    def missing():
        raise R.Unavailable("dsv3lab.nothing not importable")
    monkeypatch.setitem(R.CLAIMS, "missing", ("test", missing))
    (r,) = R.replicate("missing")
    assert r["status"] == "unavailable" and r["lab"] is None and "not importable" in r["note"]
    assert R.row("x", 1, 5, "", "m", status="unavailable")["lab"] is None


def test_compare_rules():
    assert R.compare(671, 671.03, digits=0) == "match"
    assert R.compare(37, 37.55, digits=0, rel_tol=0.02) == "close"
    assert R.compare(0.02, 0.002, rel_tol=0.25) == "differs"
    assert R.compare([1, 2], [1, 2]) == "match"
    with pytest.raises(ValueError):
        R.replicate("no-such-claim")


def test_cli_json(tmp_path, capsys):
    from dsv3lab.cli import main
    out = tmp_path / "rep.json"
    assert main(["replicate", "--json", "--only", "cost", "--only", "tpot", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(out.read_text())
    assert printed == saved
    assert {r["name"] for r in saved} == {"cost", "tpot"}
    assert main(["replicate", "--only", "kv_cache", "--out", ""]) == 0
    assert "70,272" in capsys.readouterr().out


def test_parameter_and_flop_claims():
    rows = R.replicate(["params", "flops"])
    total = by_claim(rows, "total parameters")
    assert total["status"] == "match" and total["lab"] * 1e9 == pytest.approx(671_026_404_352)
    assert by_claim(rows, "activated parameters per token")["lab"] * 1e9 == pytest.approx(37_552_282_624)
    mtp = by_claim(rows, "MTP module, unique")
    assert mtp["status"] == "close" and mtp["lab"] * 1e9 == pytest.approx(11_610_068_224)
    assert by_claim(rows, "checkpoint parameters")["lab"] * 1e9 == pytest.approx(684_489_845_504)
    assert by_claim(rows, "DeepSeek-V3 671B training")["status"] == "match"
    assert by_claim(rows, "DeepSeek-V2 236B training")["status"] == "match"


def test_sibling_instruments_report_numbers_or_unavailable():
    for r in R.replicate(["eplb", "fp8_accumulation"]):
        assert r["status"] in R.STATUSES
        assert (r["lab"] is None) == (r["status"] == "unavailable")
        if r["name"] == "eplb":
            assert r["status"] in ("match", "unavailable"), r
