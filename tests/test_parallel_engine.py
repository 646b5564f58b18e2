"""Multi-rank engine on CPU (gloo): layouts give the single-process routing, logits and greedy ids;
sharded loading reads only owned slices; failing ranks end the run with the rank named."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

import dsv3lab
from dsv3lab.parallel import Layout, LayoutError, RankError, spawn
from dsv3lab.parallel.runs import rank_run, single_run

TOKENS = torch.randint(0, 512, (3, 6), generator=torch.Generator().manual_seed(11))
NEW = 5


@pytest.fixture(scope="module")
def reference():
    return single_run("tiny", TOKENS, max_new_tokens=NEW, seed=1)


def _check_same(out, ref):
    assert set(out["topk_ids"]) == set(ref["topk_ids"])
    for k, ids in ref["topk_ids"].items():
        assert torch.equal(out["topk_ids"][k], ids), f"routing differs at {k}"
    lg, rl = out["logits"], ref["logits"]
    assert lg.shape == rl.shape
    rel = ((lg - rl).abs().max() / rl.abs().max()).item()
    assert rel < 1e-5, rel
    assert out["generated"] == ref["generated"]


LAYOUTS = [
    (1, dict(tp=1, ep=1, dp=1)),
    (2, dict(tp=2, ep=2, dp=1)),                              # official split, all-to-all
    (2, dict(tp=2, ep=1, dp=1)),                              # tp only (experts replicated)
    (2, dict(tp=1, ep=2, dp=2)),                              # ep only, DP attention
    (2, dict(tp=2, ep=2, dp=1, moe_comm="allreduce")),        # the official demo exactly
    (2, dict(tp=1, ep=2, dp=2, moe_comm="allreduce")),
    (4, dict(tp=4, ep=4, dp=1)),
    (4, dict(tp=1, ep=4, dp=4)),                              # one DP group idle: serves experts
    (4, dict(tp=2, ep=4, dp=2)),                              # mixed
    (4, dict(tp=2, ep=2, dp=2, moe_comm="allreduce")),
]


@pytest.mark.parametrize("world,layout", LAYOUTS, ids=[f"w{w}-" + "-".join(f"{k}{v}" for k, v in l.items())
                                                       for w, l in LAYOUTS])
def test_layout_matches_single_process(world, layout, reference):
    out = spawn(rank_run, world, "tiny", layout, TOKENS, max_new_tokens=NEW, seed=1)
    _check_same(out, reference)
    lay = Layout(**layout)
    E = dsv3lab.ModelConfig.preset("tiny").n_routed_experts
    owned = [r["experts"] for r in out["ranks"]]
    assert owned == [list(lay.experts_of(r % lay.ep, E)) for r in range(world)]
    if layout.get("moe_comm", "alltoall") == "alltoall" and lay.ep > 1:
        # every (token, expert) pair of the forward went to exactly its owner
        sent = torch.tensor([[c["pairs_sent"] for c in r["forward_comm"]] for r in out["ranks"]])
        recv = torch.tensor([[c["pairs_recv"] for c in r["forward_comm"]] for r in out["ranks"]])
        k = dsv3lab.ModelConfig.preset("tiny").num_experts_per_tok
        n_moe = sum(1 for c in out["ranks"][0]["forward_comm"] if c["calls"])    # MTP's MoE is not run
        assert int(sent.sum()) == TOKENS.numel() * k * n_moe
        for g in range(world // lay.ep):       # what rank i sent to j is what j received from i
            rs = range(g * lay.ep, (g + 1) * lay.ep)
            for i in rs:
                for j in rs:
                    assert torch.equal(sent[i, :, j % lay.ep], recv[j, :, i % lay.ep])


def test_world_one_without_distributed(reference):
    """apply_layout on a one-rank world needs no process group and changes nothing."""
    from dsv3lab.parallel import apply_layout, comm_stats
    model = apply_layout(dsv3lab.build("tiny", seed=1), Layout())
    assert not dist.is_initialized()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference["logits"], rtol=1e-6, atol=1e-7)
    assert comm_stats(model)[0]["tokens"] == TOKENS.numel()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = dsv3lab.build("tiny", seed=1)
    fp32 = dsv3lab.save(model, str(d / "fp32"), max_shard_bytes=200_000)
    fp8 = dsv3lab.save(model, str(d / "fp8"), fp8=True)
    return fp32, fp8


def test_sharded_load_matches(checkpoints):
    fp32, fp8 = checkpoints
    for path, layout in ((fp32, dict(tp=2, ep=2, dp=1)), (fp8, dict(tp=2, ep=2, dp=1))):
        # the FP8 checkpoint stores the rest in bf16: compare in fp32 (docs/references.md#transformers, trap 2)
        ref = single_run(path, TOKENS, max_new_tokens=NEW, dtype=torch.float32)
        out = spawn(rank_run, 2, path, layout, TOKENS, max_new_tokens=NEW, dtype=torch.float32)
        _check_same(out, ref)


def test_sharded_load_reads_only_owned_bytes(checkpoints):
    """Placed without processes: what each rank of a 4-rank layout reads is exactly what it holds."""
    from dsv3lab.parallel import load_sharded, param_bytes
    from dsv3lab.parallel.loading import CountingReader, checkpoint_bytes
    fp32, fp8 = checkpoints
    layout = Layout(tp=2, ep=4, dp=2)
    cfg = dsv3lab.ModelConfig.preset("tiny")
    total = checkpoint_bytes(fp32)
    reads = []
    for rank in range(4):
        reader = CountingReader(fp32)
        seen = []
        get = reader.get
        reader.get = lambda key, rows=None, cols=None: (seen.append(key), get(key, rows=rows, cols=cols))[1]
        m = load_sharded(fp32, layout, rank=rank, reader=reader)
        assert reader.bytes_read == param_bytes(m)
        owned = set(layout.experts_of(rank % 4, cfg.n_routed_experts))
        experts = {int(k.split(".experts.")[1].split(".")[0]) for k in seen if ".experts." in k}
        assert experts == owned
        reads.append(reader.bytes_read)
        with pytest.raises(RuntimeError, match="virtual"):   # no process groups: no forward
            m(TOKENS)
    # the MTP copies of embedding/head are never read; everything else is split or replicated
    assert sum(reads) < 0.75 * total * 2
    assert max(reads) < 0.45 * total
    # FP8: weight slices and the scale blocks covering them
    m = load_sharded(fp8, layout, rank=1)
    assert m._dsv3_load["bytes_read"] < 0.45 * checkpoint_bytes(fp8)


def test_bad_checkpoint_fails_before_reading(checkpoints, tmp_path):
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    from dsv3lab.checkpoint import CheckpointError
    from dsv3lab.parallel import load_sharded
    from dsv3lab.parallel.loading import CountingReader
    fp32, fp8 = checkpoints
    bad = tmp_path / "bad"
    shutil.copytree(fp32, bad)
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    key = "model.layers.2.mlp.experts.15.down_proj.weight"
    fn = bad / idx["weight_map"][key]
    sd = load_file(str(fn))
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(fn), metadata={"format": "pt"})
    reader = CountingReader(str(bad))
    with pytest.raises(CheckpointError, match="experts.15.down_proj"):
        load_sharded(str(bad), Layout(tp=1, ep=2, dp=2), rank=1, reader=reader)
    assert reader.bytes_read == 0
    # a rank that does not own expert 15 never looks at it
    load_sharded(str(bad), Layout(tp=1, ep=2, dp=2), rank=0)
    # FP8 kept as FP8 needs 128-aligned splits: tiny's 48-row q_b shards are not
    reader = CountingReader(fp8)
    with pytest.raises(LayoutError, match="128-blocks"):
        load_sharded(fp8, Layout(tp=2, ep=2), rank=0, fp8="keep", reader=reader)
    assert reader.bytes_read == 0


# --- faults ------------------------------------------------------------------------------------

def victim_run(rank, world, victim, how):
    t = torch.ones(4)
    for step in range(200):
        if rank == victim and step == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("injected failure")
        dist.all_reduce(t)
        time.sleep(0.01)
    return "finished"


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_failing_rank_is_named(how):
    t = time.monotonic()
    with pytest.raises(RankError) as e:
        spawn(victim_run, 2, 1, how, pg_timeout=20)
    assert e.value.rank == 1
    assert "rank 1" in str(e.value)
    if how == "kill":
        assert "SIGKILL" in str(e.value)
    else:
        assert "ValueError: injected failure" in str(e.value)
    assert time.monotonic() - t < 30


def test_spawn_rejects_local_functions():
    def local(rank, world):
        return rank
    with pytest.raises(ValueError, match="importable"):
        spawn(local, 2)


# --- torchrun ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_generate_matches_one_process(checkpoints):
    fp32, _ = checkpoints
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    args = [fp32, "--prompt-ids", "5,17,300,2", "--max-new-tokens", "6"]
    one = subprocess.run([sys.executable, "-m", "dsv3lab", "generate", *args], env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dsv3lab", "generate", *args, "--tp", "1", "--dp", "2", "--ep", "2"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr
    ids = [l for l in one.stdout.splitlines() if l.startswith("ids:")]
    assert ids and ids == [l for l in two.stdout.splitlines() if l.startswith("ids:")]


# --- FP8 dispatch and MTP speculative decoding across ranks --------------------------------------

def _fake_fp8_experts(model):
    """The single-process model as FP8 dispatch computes it: every routed expert sees its input
    rows rounded to e4m3 with one scale per 1x128 tile (``dsv3lab.fp8.act_quant``, amax -> 448)
    and returns bf16-rounded outputs. Hooks on the plain model; the MoE code is untouched."""
    from dsv3lab.fp8 import act_dequant, act_quant
    from dsv3lab.model.moe import MoE

    def pre(mod, args):
        x = args[0]
        D = x.shape[-1]
        xp = torch.nn.functional.pad(x.float(), (0, (-D) % 128))
        q, s = act_quant(xp, 128)
        return (act_dequant(q, s, 128)[:, :D].to(x.dtype),)

    def post(mod, args, out):
        return out.to(torch.bfloat16).to(out.dtype)

    for blk in list(model.layers) + list(model.mtp):
        if isinstance(blk.mlp, MoE):
            for e in blk.mlp.experts:
                e.register_forward_pre_hook(pre)
                e.register_forward_hook(post)
    return model


@pytest.fixture(scope="module")
def fp8_and_mtp_runs():
    """One 2-rank spawn: TP2xEP2 with native and FP8 dispatch, then MTP speculative decoding
    under TP2xEP2 and under EP2xDP2 (two groups drafting and accepting independently)."""
    from dsv3lab.parallel.runs import rank_runs
    base = dict(source="tiny", tokens=TOKENS, seed=1)
    runs = [dict(base, layout=dict(tp=2, ep=2)),
            dict(base, layout=dict(tp=2, ep=2, fp8_dispatch=True)),
            dict(base, layout=dict(tp=2, ep=2), max_new_tokens=8, speculative=True),
            dict(base, layout=dict(tp=1, ep=2, dp=2), max_new_tokens=8, speculative=True),
            # FP8 dispatch while one DP group (1 prompt of 3) finishes first and serves empty sends
            dict(base, layout=dict(tp=1, ep=2, dp=2, fp8_dispatch=True), max_new_tokens=8, speculative=True)]
    return spawn(rank_runs, 2, runs)


def test_fp8_dispatch_is_the_fp8_rounding_of_native_dispatch(fp8_and_mtp_runs):
    """FP8 dispatch = the single-process model with FP8-rounded expert inputs and bf16 expert
    outputs (to fp32 rounding): the transport adds the FP8 error and nothing else. The bound on
    that error, per dispatched element, is |x^ - x| <= max(2^-4 |x|, 2^-10 s) with s = tile
    amax / 448 (3 mantissa bits; subnormal spacing 2^-9 s), checked in test_fp8_rows_bound."""
    native, fp8 = fp8_and_mtp_runs[0], fp8_and_mtp_runs[1]
    with torch.no_grad():
        ref = _fake_fp8_experts(dsv3lab.build("tiny", seed=1))(TOKENS)
    scale = native["logits"].abs().max()
    assert ((fp8["logits"] - ref).abs().max() / scale).item() < 1e-5
    err = ((fp8["logits"] - native["logits"]).abs().max() / scale).item()
    assert 1e-4 < err < 0.1, err                  # really quantized, and only by FP8's rounding
    # bytes on the wire: D e4m3 + ceil(D/128) fp32 scales per pair out, 2 D (bf16) back
    D = dsv3lab.ModelConfig.preset("tiny").hidden_size
    for r in fp8["ranks"]:
        me = r["rank"] % 2
        for c, cn in zip(r["forward_comm"], native["ranks"][r["rank"]]["forward_comm"]):
            out_pairs = sum(c["pairs_sent"]) - c["pairs_sent"][me]
            in_pairs = sum(c["pairs_recv"]) - c["pairs_recv"][me]
            assert c["dispatch_bytes"] == out_pairs * (D + 4)
            assert c["combine_bytes"] == in_pairs * 2 * D
            if c["calls"]:
                assert cn["dispatch_bytes"] == (sum(cn["pairs_sent"]) - cn["pairs_sent"][me]) * D * 4


def test_fp8_rows_bound():
    from dsv3lab.parallel.dispatch import dequantize_rows, fp8_row_bytes, quantize_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 320, generator=g) * torch.logspace(-6, 2, 320)     # a 64-wide last tile, outliers
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 3)
    xr = dequantize_rows(q, s, torch.float32)
    tile_s = s.repeat_interleave(128, dim=1)[:, :320]
    bound = torch.maximum(2.0 ** -4 * x.abs(), 2.0 ** -10 * tile_s)
    ratio = ((xr - x).abs() / bound).max().item()
    assert 0.5 < ratio <= 1.0 + 1e-6, ratio        # holds, and is nearly attained
    assert fp8_row_bytes(7168) == 7168 + 56 * 4    # V3: 7,392 B per dispatched token-expert pair
    q, s = quantize_rows(x[:0])                      # a rank with nothing to send
    assert dequantize_rows(q, s, torch.float32).shape == (0, 320)


def test_mtp_speculative_under_tp_ep_equals_one_process(fp8_and_mtp_runs):
    one = single_run("tiny", TOKENS, max_new_tokens=8, seed=1, speculative=True)
    plain = single_run("tiny", TOKENS, max_new_tokens=8, seed=1)
    assert one["generated"] == plain["generated"]
    fp8 = fp8_and_mtp_runs[4]["generated"]
    assert len(fp8) == 3 and all(len(g) == len(o) for g, o in zip(fp8, one["generated"]))
    for out in fp8_and_mtp_runs[2:4]:
        assert out["generated"] == one["generated"], out["layout"]
        # the MTP block's MoE ran under expert parallelism (its layer's dispatcher was called)
        mtp_layer = dsv3lab.ModelConfig.preset("tiny").num_hidden_layers
        assert any(c["layer"] == mtp_layer and c["calls"] for r in out["ranks"] for c in r["generate_comm"])
