"""Bad input, tried harder: every corruption gives the project's named error, never a raw library
traceback and never a silently wrong model; both loader entry points say the same; a save killed
mid-write leaves the previous checkpoint as it was.

Property tests use hypothesis with few examples, derandomized (the same examples every run).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import dsv3lab
from lab_models import tiny_with_biases
from dsv3lab.checkpoint import CheckpointError, is_fp8_key, module_key
from dsv3lab.config import ConfigError, ModelConfig

PROPS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


tiny_model = tiny_with_biases


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A sharded fp32 and an FP8 checkpoint of one model, and that model's state dict."""
    d = tmp_path_factory.mktemp("base")
    m = tiny_model()
    fp32 = dsv3lab.save(m, d / "fp32", max_shard_bytes=150_000)
    fp8 = dsv3lab.save(m, d / "fp8", fp8=True)
    return dict(fp32=fp32, fp8=fp8, fp32_state={k: v.clone() for k, v in dsv3lab.load(fp32).state_dict().items()})


_COPIES = [0]


def copy_of(src, tmp_path):
    _COPIES[0] += 1
    dst = tmp_path / f"c{_COPIES[0]}"
    shutil.copytree(src, dst)
    return dst


def shards(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def rewrite_tensors(d, fn):
    """Apply fn to the dict of all tensors and write them back into one shard (index updated)."""
    t = {}
    for f in shards(d):
        t.update(load_file(str(d / f)))
        os.remove(d / f)
    fn(t)
    save_file(t, str(d / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in t}}))


def load_or_error(d):
    """('ok', model) or (error type name, message); anything but our errors propagates."""
    try:
        return "ok", dsv3lab.load(d)
    except (CheckpointError, ConfigError) as e:
        return type(e).__name__, str(e)


def assert_same_model(model, state):
    sd = model.state_dict()
    assert sd.keys() == state.keys()
    for k, v in state.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k


# --- truncation, headers, indexes ---------------------------------------------------------------

@PROPS
@given(data=st.data())
def test_truncated_anywhere_is_a_named_error(base, tmp_path, data):
    d = copy_of(base["fp32"], tmp_path)
    f = data.draw(st.sampled_from(shards(d)), label="file")
    size = os.path.getsize(d / f)
    cut = data.draw(st.integers(0, size - 1), label="cut at")
    with open(d / f, "r+b") as fh:
        fh.truncate(cut)
    status, msg = load_or_error(d)
    assert status == "CheckpointError" and f in msg, msg


@PROPS
@given(data=st.data())
def test_corrupted_header_is_a_named_error_or_the_same_model(base, tmp_path, data):
    """Bytes of the 8-byte length prefix or of the JSON header overwritten at random: either the
    loader names the file, or (a change the format does not read, say inside a string of
    metadata) the model is bit-identical to the original."""
    d = copy_of(base["fp32"], tmp_path)
    f = data.draw(st.sampled_from(shards(d)), label="file")
    raw = bytearray((d / f).read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4), label="bytes changed")):
        pos = data.draw(st.integers(0, header_end - 1), label="at")
        raw[pos] = data.draw(st.integers(0, 255).filter(lambda b, p=pos: b != raw[p]), label="to")
    (d / f).write_bytes(bytes(raw))
    status, out = load_or_error(d)
    if status == "ok":
        assert_same_model(out, base["fp32_state"])
    else:
        assert status == "CheckpointError" and f in out, out


@PROPS
@given(data=st.data())
def test_index_naming_missing_or_wrong_shards(base, tmp_path, data):
    d = copy_of(base["fp32"], tmp_path)
    idx_path = d / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    wm = idx["weight_map"]
    keys = sorted(wm)
    how = data.draw(st.sampled_from(["missing file", "wrong file", "drop key", "add key", "not a path"]))
    key = data.draw(st.sampled_from(keys), label="key")
    # the MTP layer's stored copies of embedding and head are never read (load skips them)
    copy = module_key(ModelConfig.preset("tiny"), key) is None
    if how == "missing file":
        wm[key] = data.draw(st.text("abcdefgh0123456789-.", min_size=1, max_size=20)
                            .map(lambda s: s + ".safetensors").filter(lambda s: s not in os.listdir(d)), label="file")
        want = "which is not in"
    elif how == "wrong file":
        others = [f for f in shards(d) if f != wm[key]]
        wm[key] = data.draw(st.sampled_from(others))
        want = None if copy else "although the index lists it there"
    elif how == "drop key":
        del wm[key]
        want = None if copy else "missing from the checkpoint"
    elif how == "add key":
        wm[key + ".extra"] = wm[key]
        want = "unexpected"
    else:
        wm[key] = "../" + wm[key]
        want = "which is not in"
    idx_path.write_text(json.dumps(idx))
    status, out = load_or_error(d)
    if want is None:
        assert status == "ok"
        assert_same_model(out, base["fp32_state"])
    else:
        assert status == "CheckpointError" and want in out, (how, out)


def test_index_that_is_not_an_index(base, tmp_path):
    for raw in [b"{not json", b'{"metadata": {}}', b'{"weight_map": ["a"]}', b'{"weight_map": {"lm_head.weight": 3}}',
                b"\xff\xfe\x00", b"[]"]:
        d = copy_of(base["fp32"], tmp_path)
        (d / "model.safetensors.index.json").write_bytes(raw)
        status, msg = load_or_error(d)
        assert status == "CheckpointError" and "not a safetensors index" in msg, (raw, msg)


# --- config fields ------------------------------------------------------------------------------

_POSITIVE = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
             "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings",
             "rope_theta", "rms_norm_eps", "routed_scaling_factor"]
_NON_NEGATIVE = ["first_k_dense_replace", "q_lora_rank", "num_nextn_predict_layers", "n_shared_experts",
                 "index_n_heads", "index_head_dim", "index_topk"]
_INT_FIELDS = [f for f in _POSITIVE + _NON_NEGATIVE if f not in ("rope_theta", "rms_norm_eps",
                                                                  "routed_scaling_factor")]


@st.composite
def bad_field(draw):
    kind = draw(st.sampled_from(["zero or negative", "negative", "too large", "wrong type", "odd rope"]))
    if kind == "zero or negative":
        f = draw(st.sampled_from(_POSITIVE))
        v = draw(st.integers(-10 ** 6, 0)) if f in _INT_FIELDS else draw(st.floats(-1e6, 0.0))
    elif kind == "negative":
        f = draw(st.sampled_from(_NON_NEGATIVE))
        v = draw(st.integers(-10 ** 6, -1))
    elif kind == "too large":
        f, v = draw(st.sampled_from([
            ("num_experts_per_tok", draw(st.integers(17, 10 ** 4))),      # tiny has 16 experts
            ("topk_group", draw(st.integers(5, 100))),                    # of 4 groups
            ("n_group", draw(st.sampled_from([3, 5, 6, 7, 9, 32]))),      # 16 experts do not divide
            ("first_k_dense_replace", draw(st.integers(4, 100))),         # of 3 layers
        ]))
    elif kind == "wrong type":
        f = draw(st.sampled_from(_INT_FIELDS))
        v = draw(st.one_of(st.text(max_size=5), st.floats(0.5, 1e3).filter(lambda x: x != int(x)),
                           st.booleans(), st.lists(st.integers(), max_size=2)))
    else:
        f, v = "qk_rope_head_dim", draw(st.integers(0, 40).map(lambda i: 2 * i + 1))
    return f, v


@PROPS
@given(fv=bad_field())
def test_config_field_out_of_range_names_the_field(fv):
    f, v = fv
    d = ModelConfig.preset("tiny").to_hf()
    d[f] = v
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(d)
    assert f in str(e.value), (f, v, str(e.value))


def test_config_field_out_of_range_through_a_checkpoint(base, tmp_path):
    d = copy_of(base["fp32"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, kv_lora_rank=-3)))
    status, msg = load_or_error(d)
    assert status == "ConfigError" and "kv_lora_rank" in msg and "config.json" in msg


# --- FP8 scale grids ----------------------------------------------------------------------------

@PROPS
@given(data=st.data())
def test_fp8_wrong_scale_grid_names_tensor_and_shapes(base, tmp_path, data):
    d = copy_of(base["fp8"], tmp_path)
    names = sorted(k for k in load_file(str(d / shards(d)[0])) if is_fp8_key(k))
    key = data.draw(st.sampled_from(names), label="weight")
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3), label="scale shape")
    right = {}

    def change(t):
        right["shape"] = list(t[key + "_scale_inv"].shape)
        t[key + "_scale_inv"] = torch.ones(shape)

    rewrite_tensors(d, change)
    status, out = load_or_error(d)
    if shape == right["shape"]:        # drew the right grid (of ones): a valid checkpoint
        assert status == "ok"
    else:
        assert status == "CheckpointError", out
        assert f"{key}_scale_inv" in out and str(shape) in out and f"needs {right['shape']}" in out, out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_fp8_bad_scale_values_are_named(base, tmp_path, value):
    d = copy_of(base["fp8"], tmp_path)
    key = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    rewrite_tensors(d, lambda t: t[key].__setitem__((0, 0), value))
    status, msg = load_or_error(d)
    assert status == "CheckpointError" and key in msg and "negative or non-finite" in msg


def test_nan_weight_is_named(base, tmp_path):
    for ck, key in (("fp32", "model.layers.0.mlp.up_proj.weight"), ("fp8", "model.layers.0.mlp.up_proj.weight")):
        d = copy_of(base[ck], tmp_path)

        def poison(t):
            w = t[key]
            if w.dtype == torch.float8_e4m3fn:
                w.view(torch.uint8)[3, 5] = 0x7F          # e4m3fn's NaN
            else:
                w[3, 5] = float("nan")

        rewrite_tensors(d, poison)
        status, msg = load_or_error(d)
        assert status == "CheckpointError" and key in msg and "NaN" in msg, (ck, msg)


# --- the same error from both entry points ------------------------------------------------------

def _bad_cases(base, tmp_path):
    """Every bad input of tests/test_checkpoint.py and tests/test_parallel_engine.py (and the
    new ones above), as checkpoint directories. name -> (path, only_some_ranks_see_it)."""
    fp32, fp8 = base["fp32"], base["fp8"]
    cases = {}

    def case(name, src, fn=None, tensors=None, local=False):
        d = copy_of(src, tmp_path)
        if tensors is not None:
            rewrite_tensors(d, tensors)
        if fn is not None:
            fn(d)
        cases[name] = (str(d), local)

    case("missing tensor", fp32, tensors=lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    case("extra tensor", fp32, tensors=lambda t: t.__setitem__("model.layers.0.self_attn.rotary.weight",
                                                               torch.zeros(3)))
    case("misshapen tensor", fp32, tensors=lambda t: t.__setitem__("model.layers.1.self_attn.kv_b_proj.weight",
                                                                   torch.zeros(5, 7)))
    case("misshapen expert (its owner only)", fp32, local=True, tensors=lambda t: t.__setitem__(
        "model.layers.2.mlp.experts.15.down_proj.weight", t["model.layers.2.mlp.experts.15.down_proj.weight"][:, :-1]
        .contiguous()))

    def truncate(d):
        f = d / shards(d)[0]
        f.write_bytes(f.read_bytes()[: os.path.getsize(f) // 2])

    def not_safetensors(d):
        (d / shards(d)[0]).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)

    def missing_shard(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        idx["weight_map"]["lm_head.weight"] = "model-00009-of-00009.safetensors"
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))

    def config(**kw):
        def f(d):
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(dict(cfg, **kw)))
        return f

    def remove_all(d):
        shutil.rmtree(d)

    def empty(d):
        for f in os.listdir(d):
            if f != "config.json":
                os.remove(d / f)

    case("truncated file", fp32, truncate)
    case("not a safetensors file", fp32, not_safetensors)
    case("index names a missing shard", fp32, missing_shard)
    case("unknown model_type", fp32, config(model_type="mixtral"))
    case("inconsistent config", fp32, config(n_group=5))
    case("fp8 scale misshapen", fp8, tensors=lambda t: t.__setitem__(
        "model.layers.0.self_attn.o_proj.weight_scale_inv", torch.ones(3, 3)))
    case("fp8 scale missing", fp8, tensors=lambda t: t.pop("model.layers.0.self_attn.o_proj.weight_scale_inv"))
    case("fp8 scale NaN", fp8, tensors=lambda t: t["model.layers.0.self_attn.o_proj.weight_scale_inv"]
         .__setitem__((0, 0), float("nan")))
    case("ue8m0 scale not a power of two", fp8, config(quantization_config=dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128],
        scale_fmt="ue8m0")))
    case("no checkpoint directory", fp32, remove_all)
    case("empty directory", fp32, empty)
    return cases


def both_load_and_report(rank, world, cases):
    """Rank function: try every case with load_sharded; every rank's outcome to rank 0."""
    import torch.distributed as dist
    from dsv3lab.parallel import load_sharded
    from dsv3lab.parallel.context import ParallelContext
    from dsv3lab.parallel import Layout
    ctx = ParallelContext.init(Layout(tp=2, ep=2, dp=1))      # heads split, experts 0-7 | 8-15
    mine = {}
    for name, (path, _) in cases.items():
        try:
            load_sharded(path, ctx)
            mine[name] = ("ok", "")
        except Exception as e:            # noqa: BLE001 - reported, and compared by the test
            mine[name] = (type(e).__name__, str(e))
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def test_load_and_sharded_load_give_the_same_errors(base, tmp_path):
    from dsv3lab.parallel import spawn
    cases = _bad_cases(base, tmp_path)
    one = {name: load_or_error(path) for name, (path, _) in cases.items()}
    ranks = spawn(both_load_and_report, 2, cases)
    for name, (path, local) in cases.items():
        want = one[name]
        assert want[0] in ("CheckpointError", "ConfigError"), (name, want)
        got = [r[name] for r in ranks]
        failed = [g for g in got if g[0] != "ok"]
        assert failed, f"{name}: no rank failed"
        assert all(g == want for g in failed), f"{name}: load said {want}, ranks said {got}"
        if not local:
            assert len(failed) == 2, f"{name}: every rank reads it, yet {got}"


def test_every_fp8_mode_gives_the_same_errors(base, tmp_path):
    """The memory-mapped modes (fp8="keep": weights as stored, views of the shards; "quantize")
    reject every bad input with the error the copying loader ("dequant") gives."""
    for name, (path, _) in _bad_cases(base, tmp_path).items():
        want = load_or_error(path)
        assert want[0] in ("CheckpointError", "ConfigError"), (name, want)
        for mode in ("keep", "quantize"):
            try:
                dsv3lab.load(path, fp8=mode)
                got = ("ok", "")
            except (CheckpointError, ConfigError) as e:
                got = (type(e).__name__, str(e))
            assert got == want, f"{name}: fp8={mode!r} said {got}, dequant said {want}"


# --- interrupted save ---------------------------------------------------------------------------

_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch as st
    import dsv3lab
    import dsv3lab.atomic
    where, path = sys.argv[1], sys.argv[2]
    if where == "after first shard":
        real = st.save_file
        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)      # one whole shard on disk, the rest not
        st.save_file = save_file
    elif where == "before the swap":
        def exchange(a, b):
            os.kill(os.getpid(), signal.SIGKILL)      # everything written, nothing swapped
        dsv3lab.atomic.exchange_dirs = exchange
    m = dsv3lab.build("tiny", seed=2)
    dsv3lab.save(m, path, max_shard_bytes=150_000)
    print("finished")
""")


@pytest.mark.parametrize("where", ["after first shard", "before the swap"])
def test_save_killed_mid_write_leaves_previous_checkpoint(tmp_path, where):
    m = tiny_model(seed=1)
    d = dsv3lab.save(m, tmp_path / "ck", max_shard_bytes=150_000)
    (tmp_path / "ck" / "tokenizer.json").write_text("{}")
    before = {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(d)}
    p = subprocess.run([sys.executable, "-c", _KILLED_SAVE, where, d], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr[-2000:])
    assert "finished" not in p.stdout
    after = {f: (tmp_path / "ck" / f).read_bytes() for f in os.listdir(d)}
    assert after == before                                   # bit-identical, file for file
    assert_same_model(dsv3lab.load(d), {k: v for k, v in m.state_dict().items()})
    # the killed writer's temporary directory is all that is left beside it; the next save works
    assert all(f == "ck" or f.startswith("ck.tmp-") for f in os.listdir(tmp_path))
    m2 = tiny_model(seed=3)
    dsv3lab.save(m2, d, max_shard_bytes=150_000)
    assert_same_model(dsv3lab.load(d), m2.state_dict())
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "{}"
