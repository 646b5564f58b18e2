"""`dsv3lab bench peers`: the measurement protocol, the converter plumbing, and (when
llama-cpp-python and llama.cpp's converter are installed: docs/performance.md#llamacpp) a run
end to end on the tiny preset in which llama.cpp, an independent implementation, must decode
our converted checkpoint to the same greedy tokens (a smoke test, not a timing test)."""

import json
import math

import pytest

from dsv3lab.bench import gguf_export
from dsv3lab.bench.measure import alternating_rounds, median_limits, summarize


def test_rounds_alternate_and_limits_bracket_them():
    calls = []

    def measure(engine, r):
        calls.append((r, engine))
        # work x value / limit: "fast" reads 2 bytes x 60/s against a 100 B/s copy = 120%
        return [dict(what="decode", value=60.0 if engine == "fast" else 10.0 + r, unit="tok/s",
                     work=2.0, limit="copy")]

    n_lim = []
    per, lims = alternating_rounds(["slow", "fast"], 3, measure, lambda: n_lim.append(1) or {"copy": 100.0})
    assert calls == [(0, "slow"), (0, "fast"), (1, "fast"), (1, "slow"), (2, "slow"), (2, "fast")]
    assert len(lims) == 4                       # before each round and after the last
    rows = {r["engine"]: r for r in summarize(per, median_limits(lims), dtype="float32")}
    slow = rows["slow"]
    assert (slow["value"], slow["lo"], slow["hi"], slow["rounds"]) == (11.0, 10.0, 12.0, 3)
    assert slow["pct_of_limit"] == pytest.approx(100 * 11.0 * 2 / 100) and slow["valid"]
    assert rows["fast"]["pct_of_limit"] == pytest.approx(120.0) and not rows["fast"]["valid"]
    assert rows["fast"]["dtype"] == "float32"


def test_figure_without_limit_is_nan_and_valid():
    per = {"a": {"kv": [dict(what="kv", value=4.0, unit="B/token")]}}
    (row,) = summarize(per, {"copy": 1.0})
    assert math.isnan(row["pct_of_limit"]) and row["valid"]


def test_pre_tokenizer_name(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}))
    assert gguf_export.pre_tokenizer_name(str(p)) == "gpt-2"
    p.write_text(json.dumps({"pre_tokenizer": {"type": "Metaspace"}}))
    assert gguf_export.pre_tokenizer_name(str(p)) is None


def test_missing_converter_names_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")) as e:
        gguf_export.find_converter(str(tmp_path / "nowhere"))
    assert "llama-cpp-python==" in str(e.value)


def test_tokenizer_fits_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer
    path = gguf_export.ensure_tokenizer(str(tmp_path), 300)      # smaller than the lab's: trained
    tok = Tokenizer.from_file(path)
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1
    text = "The list data type."
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(ValueError, match="more than the config's vocab_size 200"):
        gguf_export.ensure_tokenizer(str(tmp_path), 200)


def _converter_or_skip():
    try:
        return gguf_export.find_converter()
    except FileNotFoundError as e:
        pytest.skip(f"llama.cpp's converter not installed (optional benchmark dependency): {e}")


def test_bench_peers_tiny(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (optional benchmark dependency, "
                                            "docs/performance.md#llamacpp)")
    gguf = pytest.importorskip("gguf", reason="gguf not installed (optional benchmark dependency)")
    _converter_or_skip()
    from dsv3lab.cli import main
    out = tmp_path / "peers.json"
    rc = main(["bench", "peers", "--preset", "tiny", "--dtypes", "float32", "--prefill", "16",
               "--decode", "16", "--decode-steps", "1", "--rounds", "2", "--threads", "1", "--agree-steps", "8",
               "--work", str(tmp_path / "work"), "--out", str(out)])
    res = json.loads(out.read_text())
    agree = {a["model"]: a for a in res["agreement"]}
    # llama.cpp reads the trained lab model (via its own converter) as the same model
    lab = agree["lab"]
    assert lab["first_step_logit_rel_err"] < 1e-3
    assert lab["agree"] == lab["steps"] == 8 and lab["dsv3lab_tokens"] == lab["llamacpp_tokens"]
    assert 0 <= agree["bench"]["agree"] <= 8 and agree["bench"]["first_step_logit_rel_err"] < 1e-2
    assert rc == 0
    rows = {(r["engine"], r["what"]): r for r in res["rows"]}
    for eng in ("dsv3lab", "llama.cpp"):
        assert rows[(eng, "prefill 16")]["value"] > 0 and rows[(eng, "decode @16")]["rounds"] == 2
        assert rows[(eng, "kv cache")]["value"] == 3 * (32 + 8) * 4     # fp32 latent + rope key, 3 layers
    assert len(res["limits"]["float32"]["rounds"]) == 3
    # the file is llama.cpp's DeepSeek-2 architecture with our config (gguf's own reader)
    r = gguf.GGUFReader(str(tmp_path / "work" / "bench-f32.gguf"))
    fields = {k: r.fields[k].contents() for k in ("general.architecture", "deepseek2.block_count",
                                                     "deepseek2.expert_count", "deepseek2.attention.kv_lora_rank")}
    assert fields == {"general.architecture": "deepseek2", "deepseek2.block_count": 3,
                      "deepseek2.expert_count": 16, "deepseek2.attention.kv_lora_rank": 32}


def test_llamacpp_model_params_reach_its_loader_and_are_restored(monkeypatch):
    """``Llama`` has no argument for ``use_extra_bufts`` (off where llama.cpp's AMX buffer would
    abort a DeepSeek-2 graph): the parameters its constructor starts from carry it during the
    load, and a name the struct lacks is an error rather than an attribute ctypes keeps aside."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from dsv3lab.bench import peers
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params
    assert default().use_extra_bufts                  # llama.cpp's default: on
    with peers._llamacpp_model_params(use_extra_bufts=False):
        assert low.llama_model_default_params().use_extra_bufts is False
    assert low.llama_model_default_params is default
    with pytest.raises(RuntimeError, match="no field 'use_extra_buffers'"):
        with peers._llamacpp_model_params(use_extra_buffers=False):
            low.llama_model_default_params()
    assert low.llama_model_default_params is default
    monkeypatch.setattr("dsv3lab.kernels.cpu_compile.cpu_flags", lambda: frozenset({"avx2", "amx_int8"}))
    assert peers.llamacpp_extra_bufts() is False
    monkeypatch.setattr("dsv3lab.kernels.cpu_compile.cpu_flags", lambda: frozenset({"avx2"}))
    assert peers.llamacpp_extra_bufts() is True
