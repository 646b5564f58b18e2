"""The C kernels run only where they measured faster than torch (kernels/cpu_calibrate.py).

Timings are not asserted (they belong to benchmarks): what is tested is that the measurement
covers every kernel, is stored beside the library and read back instead of measured again, that
a verdict is obeyed by the engine both ways, and that bad settings are named.
"""

import time

import pytest
import torch

import dsv3lab
import dsv3lab.fast
from dsv3lab.kernels import backend, cpu_compile, cpu_calibrate, cpu_decode
from dsv3lab.fast import step as decode_step

needs_c = pytest.mark.skipif(not cpu_decode.available(), reason="the C kernels cannot be built here (no compiler)")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """A fresh cache directory and the 'measured' mode (conftest sets 'all' for the other tests)."""
    monkeypatch.setenv("DSV3LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("DSV3LAB_CPU_KERNELS", "measured")
    monkeypatch.setattr(cpu_calibrate, "STREAM_BYTES", 1 << 20)       # small operands: a test, not a benchmark
    cpu_compile._compile_library.cache_clear()
    cpu_decode._library.cache_clear()
    cpu_calibrate._verdicts.cache_clear()
    yield tmp_path
    cpu_compile._compile_library.cache_clear()
    cpu_decode._library.cache_clear()
    cpu_calibrate._verdicts.cache_clear()


@needs_c
def test_every_kernel_is_measured_stored_and_read_back(measured, monkeypatch):
    with pytest.warns(UserWarning, match="timing the C decode kernels"):
        first = cpu_calibrate.calibrate(force=True, rounds=1)
    want = {cpu_calibrate.key(k, d) for k, ds in cpu_calibrate.KERNELS.items() for d in ds}
    assert set(first) == want
    for name, v in first.items():
        if v["c_us"] == v["c_us"]:                              # NaN: the sparse library is missing
            assert v["c_us"] > 0 and v["torch_us"] > 0, name
            assert v["use"] == (v["c_us"] < v["torch_us"]), name
            assert v["speedup"] == pytest.approx(v["torch_us"] / v["c_us"])
    files = list(measured.glob("decode_bf16-*.calibration.json"))
    assert len(files) == 1 and cpu_compile.march() in files[0].name
    # read back, not measured again
    monkeypatch.setattr(cpu_calibrate, "_measure", lambda *a: pytest.fail("measured twice"))
    cpu_calibrate._verdicts.cache_clear()
    assert cpu_calibrate.verdicts() == first == cpu_calibrate.cached()
    rows = cpu_calibrate.table()
    assert len(rows) == len(want) and {r["used"] for r in rows} <= {"yes", "no: torch's call"}


def _verdicts_all(use: bool) -> dict:
    return {cpu_calibrate.key(k, d): dict(c_us=1.0, torch_us=1.0, speedup=1.0, use=use)
            for k, ds in cpu_calibrate.KERNELS.items() for d in ds}


@needs_c
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_losing_kernel_is_never_called_a_winning_one_is(measured, monkeypatch, dtype):
    m = dsv3lab.build("tiny", seed=0, dtype=dtype).eval()
    x = torch.randint(0, m.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    calls = []
    for name in ("gemv", "moe", "rmsnorm", "rope", "route", "latent_attention"):
        real = getattr(cpu_decode, name)
        monkeypatch.setattr(cpu_decode, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))
    fused = []
    real_run = decode_step.DecodeStep.run
    monkeypatch.setattr(decode_step.DecodeStep, "run", lambda self, *a: fused.append(1) or real_run(self, *a))

    def decode(use: bool) -> torch.Tensor:
        monkeypatch.setattr(cpu_calibrate, "verdicts", lambda: _verdicts_all(use))
        # the fused step as a whole: its own timing against the module path (decided here)
        monkeypatch.setattr(decode_step, "_time_step", lambda *a: (use, 1.0, 1.0))
        decode_step._STEP_VERDICTS.pop(m, None)
        calls.clear()
        fused.clear()
        with torch.no_grad():
            cache = m.new_cache(1, 6)
            m(x[:, :5], start=0, cache=cache)
            return m(x[:, 5:], start=5, cache=cache).float()

    off = decode(False)
    assert calls == [] and fused == [], (calls, fused)      # torch's calls only, no fused step
    on = decode(True)
    assert fused, "the fused decode step did not run with every kernel winning"
    # the same token either way: the two paths differ in summation order only
    assert (on - off).abs().max() <= 0.05 * off.abs().max()


@needs_c
@pytest.mark.parametrize("short_wins", [True, False])
def test_the_attention_verdict_follows_the_cache_length(measured, monkeypatch, short_wins):
    """Below SPLIT_MIN_ROWS cache rows a thread torch's attention pass runs on one thread, from
    there on all of them (model/attn_absorbed.py), so the fused step takes the C attention by the
    verdict measured for its cache's length (``latent_attention_short`` or ``latent_attention``):
    with C winning at one length only, torch's pass runs at the other length only."""
    m = dsv3lab.build("tiny", seed=0).eval()
    monkeypatch.setattr(decode_step, "SPLIT_MIN_ROWS", 4)              # short: < 4 rows a thread
    verdicts = _verdicts_all(True)
    verdicts[cpu_calibrate.key("latent_attention_short", m.dtype)]["use"] = short_wins
    verdicts[cpu_calibrate.key("latent_attention", m.dtype)]["use"] = not short_wins
    monkeypatch.setattr(cpu_calibrate, "verdicts", lambda: verdicts)
    monkeypatch.setattr(decode_step, "_time_step", lambda *a: (True, 1.0, 1.0))
    torch_rows = []
    real = decode_step.latent_attention
    monkeypatch.setattr(decode_step, "latent_attention",
                        lambda q, lat, *a, **k: torch_rows.append(lat.shape[1]) or real(q, lat, *a, **k))
    split = 4 * torch.get_num_threads()
    x = torch.randint(0, m.cfg.vocab_size, (1, 2 * split + 2), generator=torch.Generator().manual_seed(0))
    fused = {}
    with torch.no_grad():
        for n in (2, 2 * split):                # prefilled by the module path; a cache of n + 1 rows at the step
            cache = m.new_cache(1, n + 2)
            m(x[:, :n], start=0, cache=cache)
            fused[n + 1] = dsv3lab.fast.decode(m, x[:, n:n + 1], n, cache) is not None
    assert fused == {3: True, 2 * split + 1: True}
    layers = m.cfg.num_hidden_layers
    assert torch_rows == ([2 * split + 1] * layers if short_wins else [3] * layers)


def test_bad_settings_are_named(monkeypatch):
    monkeypatch.setenv("DSV3LAB_CPU_KERNELS", "fastest")
    with pytest.raises(ValueError, match="DSV3LAB_CPU_KERNELS"):
        cpu_calibrate.wins("gemv", torch.bfloat16)
    monkeypatch.setenv("DSV3LAB_CPU_KERNELS", "all")
    with pytest.raises(ValueError, match="unknown C kernel 'gemm'"):
        cpu_calibrate.wins("gemm", torch.bfloat16)
    monkeypatch.setenv("DSV3LAB_CPU_MARCH", "native; rm -rf /")
    with pytest.raises(ValueError, match="DSV3LAB_CPU_MARCH"):
        cpu_compile.march()


def test_tiers_end_with_native_and_follow_the_cpu():
    tiers = cpu_compile.tiers()
    assert tiers[-1] == "native"
    flags = cpu_compile.cpu_flags()
    for level, need in cpu_compile.X86_LEVELS.items():
        if level in tiers:
            assert all(f in flags for f in need), level
    if "x86-64-v3" in tiers:
        assert "x86-64-v2" in tiers           # levels are cumulative


@needs_c
@pytest.mark.parametrize("module_s", [0.0, 1.0])
def test_a_decisive_first_timing_skips_the_rounds(measured, monkeypatch, module_s):
    """The verdict's rounds run only when the two warm-ups do not settle it: a module path
    DECISIVE times slower than the fused step (a released-size FP8 model's, ~12 s a step)
    is timed once; one of the same order takes the alternating rounds."""
    m = dsv3lab.build("tiny", seed=0, dtype=torch.bfloat16).eval()
    x = torch.randint(0, m.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    runs = {"fused": 0, "module": 0}
    real_run = decode_step.DecodeStep.run

    def fused(self, *a):
        runs["fused"] += 1
        return real_run(self, *a)
    monkeypatch.setattr(decode_step.DecodeStep, "run", fused)
    real_forward = type(m).forward

    def forward(self, *a, **k):          # the module path: the backend is torch's inside _time_step
        if backend.get_backend() == "torch":
            runs["module"] += 1
            time.sleep(module_s)
        return real_forward(self, *a, **k)
    monkeypatch.setattr(type(m), "forward", forward)
    with torch.no_grad():
        cache = m.new_cache(1, 8)
        m(x[:, :5], start=0, cache=cache)
        runs.update(fused=0, module=0)
        m(x[:, 5:6], start=5, cache=cache)
    v = dsv3lab.fast.step_verdict(m)
    rounds = 1 + (decode_step.STEP_ROUNDS if module_s == 0.0 else 0)
    assert runs["module"] == rounds and runs["fused"] == rounds + 1        # + the step itself
    if module_s:
        assert v["used"] and v["module_ms"] >= 1000


@needs_c
def test_the_fused_step_is_timed_against_the_module_path_once_per_model(measured, monkeypatch):
    m = dsv3lab.build("tiny", seed=0, dtype=torch.bfloat16).eval()
    x = torch.randint(0, m.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
    timed = []
    real = decode_step._time_step
    monkeypatch.setattr(decode_step, "_time_step", lambda *a: timed.append(1) or real(*a))
    with torch.no_grad():
        cache = m.new_cache(1, 8)
        m(x[:, :5], start=0, cache=cache)
        assert dsv3lab.fast.step_verdict(m) is None
        for t in range(5, 8):
            m(x[:, t:t + 1], start=t, cache=cache)
    v = dsv3lab.fast.step_verdict(m)
    assert timed == [1] and v["threads"] == torch.get_num_threads()          # timed once, then obeyed
    assert v["fused_ms"] > 0 and v["module_ms"] > 0 and v["used"] == (v["fused_ms"] < v["module_ms"])
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(saved + 1)                                      # another thread count: again
        with torch.no_grad():
            m(x[:, 7:8], start=7, cache=cache)
    finally:
        torch.set_num_threads(saved)
    assert timed == [1, 1]


@needs_c
def test_the_e4m3_form_is_measured_stored_and_applied(measured, monkeypatch):
    """Where the tier widens e4m3 in two vector forms (AVX2 + F16C: the lifted one, whose
    subnormal lanes cost Intel cores a microcode assist, and F16C's conversion), the calibration
    times the FP8 MoE call in both, stores the faster beside the verdicts and sets it; a later
    process reads it back and sets it again, whatever the library's default."""
    if "x86-64-v3" not in cpu_compile.tiers():
        pytest.skip("no AVX2 + F16C tier on this CPU")
    monkeypatch.setenv("DSV3LAB_CPU_MARCH", "x86-64-v3")
    cpu_decode._library.cache_clear()
    assert cpu_calibrate.form_choice() and cpu_calibrate.form_verdict() is None
    assert "not measured yet" in cpu_calibrate.form_line()
    try:
        with pytest.warns(UserWarning, match="timing the C decode kernels"):
            cpu_calibrate.calibrate(force=True, rounds=1)
        form = cpu_calibrate.form_verdict()
        assert form is not None and form["lifted_us"] > 0 and form["f16c_us"] > 0
        assert form["use"] == (form["lifted_us"] < form["f16c_us"])
        assert cpu_decode.e4m3_lifted() == form["use"]
        assert cpu_calibrate.form_line().startswith(f"e4m3 form: {'lifted' if form['use'] else 'F16C'}")
        cpu_decode.e4m3_lifted(not form["use"])               # another process: the library's own default
        monkeypatch.setattr(cpu_calibrate, "_measure", lambda *a: pytest.fail("measured twice"))
        cpu_calibrate._verdicts.cache_clear()
        cpu_calibrate.verdicts()
        assert cpu_decode.e4m3_lifted() == form["use"]
    finally:
        cpu_decode.e4m3_lifted(True)


@needs_c
def test_a_tier_with_one_e4m3_form_stores_no_choice(measured, monkeypatch):
    """SSE (no F16C: only the lifted form keeps products normal) and AVX-512 (F16C's conversion
    of 16 lanes) have one form: nothing to set, and the line says so."""
    tier = "x86-64-v2" if "x86-64-v2" in cpu_compile.tiers() else None
    if tier is None:
        pytest.skip("no SSE tier on this CPU")
    monkeypatch.setenv("DSV3LAB_CPU_MARCH", tier)
    cpu_decode._library.cache_clear()
    assert cpu_decode.e4m3_lifted() and cpu_decode.e4m3_lifted(False)     # lifted, and stays
    assert not cpu_calibrate.form_choice()
    assert cpu_calibrate.form_line() == "e4m3 form: one vector form on this tier"


def test_operands_stream_past_the_last_level_cache(monkeypatch):
    """A timing cycles copies of its operands worth 1.5x the last-level cache (48 MB to 1 GB), so
    that each call reads them from memory as a decode step does: a fixed 48 MB sat whole in a
    Xeon VM's 480 MB L3. The copies are clones of one draw, in their own memory."""
    llc = cpu_compile.llc_bytes()
    assert llc is None or llc >= 1 << 20
    monkeypatch.setattr(cpu_calibrate, "STREAM_BYTES", None)
    for llc, want in ((480 << 20, 720 << 20), (8 << 20, cpu_calibrate.STREAM_MIN), (None, cpu_calibrate.STREAM_MIN),
                      (4 << 30, cpu_calibrate.STREAM_MAX)):
        monkeypatch.setattr(cpu_compile, "llc_bytes", lambda _l=llc: _l)
        assert cpu_calibrate.stream_bytes() == want, llc
    assert cpu_calibrate.stream_bytes(1 << 16) == 1 << 16                 # a setting wins (tests, bench cpu)
    draws = []
    items = cpu_calibrate.copies(lambda: draws.append(1) or (torch.arange(4.0), [torch.ones(2)]), 24, total=100)
    assert len(draws) == 1 and len(items) == 5
    assert all(torch.equal(it[0], items[0][0]) and torch.equal(it[1][0], items[0][1][0]) for it in items)
    assert len({it[0].data_ptr() for it in items}) == 5 and isinstance(items[3][1], list)
