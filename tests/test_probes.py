"""Instruments: hook points, routing traces, formats, load metrics (issue 4)."""

import importlib
import json
import os

import pytest
import torch

import dsv3lab
from dsv3lab.probes import (formats, hook_names, hook_table, hooks, merge, metrics, run_with_cache,
                            trace)

hooks_mod = importlib.import_module("dsv3lab.probes.hooks")   # the package's ``hooks`` is the function


@pytest.fixture(scope="module")
def model():
    m = dsv3lab.build("tiny", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-zero biases, some negative: selection must use s + b, weights s
        for mod in m.modules():
            if hasattr(mod, "e_score_correction_bias") and mod.e_score_correction_bias is not None:
                mod.e_score_correction_bias.copy_(torch.randn(mod.e_score_correction_bias.shape, generator=g) * 0.05)
    return m


def _tokens(B=2, S=9, seed=0, V=512):
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# hook points
# ---------------------------------------------------------------------------------------------

def test_hook_table_is_documented(model):
    doc = hooks_mod.__doc__
    for name in hook_table(model):
        if name.startswith("mtp.K.") and name not in doc:
            name = name.replace("mtp.K.", "layers.L.")
        assert name in doc, f"{name} missing from the table in dsv3lab/probes/hooks.py"
    names = hook_names(model)
    assert "layers.1.mlp.gate.hook_topk_ids" in names and "mtp.0.hook_h_in" in names
    assert all(isinstance(v, str) and v.startswith("[") for v in names.values())


def test_run_with_cache_shapes(model):
    cfg = model.cfg
    tok = _tokens(2, 5)
    logits, cache = run_with_cache(model, tok, ["layers.*.self_attn.hook_kv_latent", "layers.1.mlp.gate.*",
                                                "hook_logits"], mtp=True)
    assert torch.equal(cache["hook_logits"], logits)
    assert cache["layers.0.self_attn.hook_kv_latent"].shape == (2, 5, cfg.kv_lora_rank)
    assert cache["layers.1.mlp.gate.hook_topk_ids"].shape == (10, cfg.num_experts_per_tok)
    assert cache["layers.1.mlp.gate.hook_group_mask"].shape == (10, cfg.n_group)
    assert len(cache["mtp_logits"]) == 1 and cache["mtp_logits"][0].shape == (2, 4, cfg.vocab_size)
    with pytest.raises(KeyError):
        run_with_cache(model, tok, "layers.*.no_such_hook")


def test_hooks_removed_on_exit_and_exception(model):
    tok = _tokens(1, 4)
    ref = model(tok)
    with hooks(model, [("layers.1.hook_resid_post", lambda t, n: torch.zeros_like(t))]):
        patched = model(tok)
    assert not torch.allclose(patched, ref)
    with pytest.raises(RuntimeError):
        with hooks(model, [("layers.*.hook_resid_post", lambda t, n: None)]):
            raise RuntimeError("boom")
    assert not any(hp._forward_hooks for hp in hooks_mod.hook_points(model).values())
    assert torch.equal(model(tok), ref)


def test_bypassed_hook_points_compute_the_same(model):
    from dsv3lab.bench.hooks import bypass_hook_points
    tok = _tokens(1, 6)
    bare = bypass_hook_points(model)
    assert not hook_names(bare)
    assert torch.allclose(bare(tok), model(tok), atol=1e-6, rtol=0)


def test_bench_hooks_decode_mode_times_the_same_step_for_every_variant():
    from dsv3lab.bench.hooks import measure
    res = measure("tiny", reps=2, threads=1, decode=12)
    assert [r["variant"] for r in res["rows"]] == ["bypassed", "idle", "observed", "traced"]
    assert res["decode"] == 12 and res["batch"] == 1 and res["seq"] == 12
    assert all(r["median_ms"] > 0 for r in res["rows"])


# ---------------------------------------------------------------------------------------------
# the trace against an independent recomputation (report sec. 2.1.2, docs/references.md#gate,
# written here from the formulas)
# ---------------------------------------------------------------------------------------------

def _route(x, W, b, cfg):
    """x [T,D] -> (ids [T,k] sorted, weights in the same order)."""
    x, W, b = x.detach().double(), W.detach().double(), b.detach().double()
    s = 1.0 / (1.0 + torch.exp(-(x @ W.T)))           # sigmoid scores
    sel = s + b                                         # bias for selection only
    T, E = s.shape
    G, per = cfg.n_group, E // cfg.n_group
    ids_out, w_out = [], []
    for t in range(T):
        gscore = [sorted(sel[t, g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(G)]
        gscore = [sum(v) for v in gscore]
        keep = sorted(range(G), key=lambda g: -gscore[g])[:cfg.topk_group]
        cand = [e for e in range(E) if e // per in keep]
        chosen = sorted(cand, key=lambda e: -float(sel[t, e]))[:cfg.num_experts_per_tok]
        raw = torch.stack([s[t, e] for e in chosen])
        w = raw / raw.sum() * cfg.routed_scaling_factor
        order = sorted(range(len(chosen)), key=lambda i: chosen[i])
        ids_out.append([chosen[i] for i in order])
        w_out.append(torch.stack([w[i] for i in order]))
    return torch.tensor(ids_out), torch.stack(w_out).float()


def _norm(h, weight, eps):
    return weight * (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps))


def _sorted(ids, w):
    s, order = ids.sort(dim=-1)
    return s, w.gather(-1, order)


def test_trace_ids_equal_independent_recomputation(model):
    cfg = model.cfg
    tok = _tokens(2, 9)
    with trace(model, scores=True, groups=True) as t:
        _, cache = run_with_cache(model, tok, ["layers.*.hook_resid_mid", "mtp.*.hook_resid_mid"], mtp=True)
    r = t.routing
    assert r.layers == [1, 2] and r.topk_ids.shape == (2, 18, cfg.num_experts_per_tok)
    for i, layer in enumerate(r.layers):
        blk = model.layers[layer]
        x = _norm(cache[f"layers.{layer}.hook_resid_mid"], blk.post_attention_layernorm.weight, cfg.rms_norm_eps)
        ids, w = _route(x.reshape(-1, cfg.hidden_size), blk.mlp.gate.weight, blk.mlp.gate.e_score_correction_bias, cfg)
        got_ids, got_w = _sorted(r.topk_ids[i], r.topk_weights[i])
        assert torch.equal(got_ids, ids), f"layer {layer}"
        torch.testing.assert_close(got_w, w, rtol=1e-5, atol=1e-6)
    assert torch.equal(r.token_ids, tok.reshape(-1))                      # batch-major
    assert torch.equal(r.positions, torch.arange(9).repeat(2))
    assert torch.equal(r.seq, torch.arange(2).repeat_interleave(9))
    assert r.scores.shape == (2, 18, cfg.n_routed_experts) and r.group_mask.shape == (2, 18, cfg.n_group)
    assert bool((r.group_mask.sum(-1) == cfg.topk_group).all())
    # MTP depth 0: its own stream, tokens t_{i+1}
    m = t.mtp[0]
    assert m.layers == [cfg.num_hidden_layers] and m.topk_ids.shape == (1, 16, cfg.num_experts_per_tok)
    assert torch.equal(m.token_ids, tok[:, 1:].reshape(-1))
    blk = model.mtp[0]
    x = _norm(cache["mtp.0.hook_resid_mid"], blk.post_attention_layernorm.weight, cfg.rms_norm_eps)
    ids, _ = _route(x.reshape(-1, cfg.hidden_size), blk.mlp.gate.weight, blk.mlp.gate.e_score_correction_bias, cfg)
    assert torch.equal(_sorted(m.topk_ids[0], m.topk_weights[0])[0], ids)


def test_trace_over_generation(model):
    cfg = model.cfg
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    with trace(model) as t:
        out = model.generate(prompts, max_new_tokens=4, stop_tokens=[])
    r = t.routing
    steps = t.record()["meta"]["steps"]
    assert [s["start"] for s in steps] == [0, 5, 6, 7]
    assert r.n_tokens == 2 * 5 + 3 * 2
    load = r.expert_load()
    assert load.shape == (cfg.n_moe_layers, cfg.n_routed_experts)
    assert bool((load.sum(-1) == r.n_tokens * cfg.num_experts_per_tok).all())
    # decode steps see the generated tokens at the next positions
    dec = r.step == 1
    assert r.positions[dec].tolist() == [5, 5]
    assert r.token_ids[dec].tolist() == [out[0][0], out[1][0]]
    assert r.sequences().unique().numel() == 2


def test_trace_token_budget_and_incomplete_steps(model):
    tok = _tokens(2, 6)
    with trace(model, max_tokens=8) as t:
        model(tok)
        model(tok)
    r = t.routing
    assert r.n_tokens == 8 and t.record()["meta"]["dropped_tokens"] == 16
    assert torch.equal(r.token_ids, tok.reshape(-1)[:8])
    # an exception in the middle of a forward leaves no ragged step
    with trace(model) as t:
        model(tok)
        with pytest.raises(RuntimeError):
            with hooks(model, [("layers.2.mlp.gate.hook_scores", lambda x, n: (_ for _ in ()).throw(RuntimeError("x")))]):
                model(tok)
        model(tok[:1])
    r = t.routing
    assert r.n_tokens == 12 + 6
    assert t.record()["meta"]["incomplete_steps"] == 1


def test_trace_streaming_equals_in_memory(model, tmp_path):
    toks = [_tokens(2, 5, seed=s) for s in range(3)]
    with trace(model, groups=True) as mem:
        for tk in toks:
            model(tk)
    d = str(tmp_path / "stream")
    with trace(model, groups=True, stream_to=d, flush_tokens=12) as st:
        for tk in toks:
            model(tk)
    assert len([f for f in os.listdir(d) if f.startswith("chunk-")]) >= 2
    a, b = mem.record(), formats.load_trace(d)
    assert set(a["tensors"]) == set(b["tensors"])
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert torch.equal(st.routing.topk_ids, mem.routing.topk_ids)


# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def record(model):
    with trace(model, scores=True, groups=True) as t:
        model.generate([[3, 4, 5, 6], [7, 8, 9, 10]], max_new_tokens=3, stop_tokens=[])
        logits, h = model(_tokens(1, 5), return_hidden=True)
        model.mtp_logits(h[:, :-1], _tokens(1, 5)[:, 1:])
    return t.record()


def _equal_records(a, b, keys=None):
    keys = keys or a["tensors"].keys()
    for k in keys:
        x, y = a["tensors"][k], b["tensors"][k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        assert torch.equal(x, y), k


def test_dsv3lab_format_round_trip(record, tmp_path):
    p = str(tmp_path / "t.safetensors")
    formats.save_trace(record, p)
    back = formats.load_trace(p)
    assert set(back["tensors"]) == set(record["tensors"])
    _equal_records(record, back)
    assert back["meta"] == record["meta"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]      # atomic: no leftovers
    with pytest.raises(ValueError):
        formats.save_tensors({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        formats.load_trace(str(tmp_path / "plain.safetensors"))


def test_sglang_round_trip(record, model, tmp_path):
    from dsv3lab.probes.trace import Routing
    p = str(tmp_path / "expert_distribution_recorder_0.pt")
    stat = formats.to_sglang(record, p, mode="stat")
    cnt = formats.from_sglang(p)["logical_count"]
    assert cnt.shape == (4, model.cfg.num_hidden_layers, model.cfg.n_routed_experts)
    assert bool((cnt[:, 0] == 0).all())                                  # dense block: zero row
    r = Routing(record)
    per_step = metrics._grouped_load(r, "step")                             # [steps, L, E]
    assert torch.equal(cnt[:, r.layers], per_step)
    assert torch.equal(cnt.sum(0)[r.layers], r.expert_load())
    pp = str(tmp_path / "per_pass.pt")
    formats.to_sglang(record, pp, mode="per_pass")
    back = formats.from_sglang(pp)
    _equal_records(record, back, ["topk_ids", "topk_weights", "token_ids", "positions", "seq", "step"])
    assert back["meta"]["layers"] == record["meta"]["layers"]


def test_megatron_round_trip(record, tmp_path):
    p = str(tmp_path / "router_trace_rank0.jsonl")
    lines = formats.to_megatron(record, p)
    first = json.loads(open(p).readline())
    assert set(first) == {"step", "stage", "block", "layer", "rank", "num_tokens", "topk", "top_indices"}
    assert any(ln.get("mtp_idx") == 0 for ln in lines)
    back = formats.from_megatron(p, n_routed_experts=record["meta"]["n_routed_experts"])
    _equal_records(record, back, ["topk_ids", "step", "mtp.0.topk_ids", "mtp.0.step"])
    assert back["meta"]["layers"] == record["meta"]["layers"]


def test_merge_and_gather(record):
    from dsv3lab.probes.trace import Routing, gather
    r1 = dict(tensors=record["tensors"], meta=dict(record["meta"], rank=1))
    m = merge([record, r1])
    n = record["tensors"]["token_ids"].numel()
    assert torch.equal(m["tensors"]["rank"], torch.tensor([0] * n + [1] * n))
    assert torch.equal(Routing(m).expert_load(), 2 * Routing(record).expert_load())
    assert m["tensors"]["mtp.0.topk_ids"].shape[1] == 2 * record["tensors"]["mtp.0.topk_ids"].shape[1]
    assert gather(record) is record                                      # no process group
    lines = formats.to_megatron(m)
    assert {ln["rank"] for ln in lines} == {0, 1}


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

def test_load_metrics(record, model):
    from dsv3lab.probes.trace import Routing
    cfg = model.cfg
    r = Routing(record)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    ld = r.expert_load()
    assert bool((ld.sum(-1) == r.n_tokens * k).all())
    assert torch.allclose(metrics.max_vio(torch.tensor([[2.0, 2, 2, 2], [4, 0, 0, 0]])), torch.tensor([0.0, 3.0]))
    mv = metrics.max_vio_per_batch(r)
    assert mv.shape == (4, len(r.layers)) and bool((mv >= 0).all())
    assert torch.allclose(metrics.max_vio_global(r), metrics.max_vio(ld))
    si = metrics.sequence_imbalance(r)
    assert si.shape == (3, len(r.layers))                     # two generated requests + one forward
    bl = metrics.routing_balance_loss(r)
    assert bl.shape == (len(r.layers),) and bool((bl > 0).all())
    assert bool(((0 <= metrics.load_entropy(ld)) & (metrics.load_entropy(ld) <= 1)).all())
    assert torch.allclose(metrics.load_entropy(torch.ones(1, 8)), torch.ones(1))
    assert torch.allclose(metrics.routing_entropy(torch.ones(1, 5, 4)), torch.ones(1))
    C = metrics.co_selection(r.topk_ids[0], E)
    assert torch.equal(C, C.T) and torch.equal(C.diagonal(), ld[0])
    assert torch.equal(C.sum(1), ld[0] * k)
    g = metrics.groups_touched(r.topk_ids, cfg.n_group, E)
    assert g.shape == (len(r.layers), r.n_tokens) and int(g.max()) <= cfg.topk_group
    nodes = metrics.nodes_touched(r.topk_ids, metrics.contiguous_map(E, 2))
    assert bool((nodes <= 2).all()) and bool((nodes >= 1).all())
    per_rank = metrics.load_per_rank(ld, metrics.contiguous_map(E, 4))
    assert per_rank.shape == (len(r.layers), 4) and torch.equal(per_rank.sum(-1), ld.sum(-1))
    assert torch.equal(metrics.load_per_rank(torch.tensor([[1, 2, 3, 4]]), torch.tensor([1, 0, 1, 0])),
                       torch.tensor([[6, 4]]))
    # EPLB README example placement (docs/references.md#eplb): 12 experts on 16 slots over 8 GPUs
    phy2log = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]])
    lo = torch.arange(12.0)[None] + 1
    pr = metrics.load_per_rank_replicated(lo, phy2log, 8)
    assert pr.shape == (1, 8) and abs(float(pr.sum()) - float(lo.sum())) < 1e-9
    assert abs(float(pr[0, 0]) - (6 / 2 + 7.0)) < 1e-9              # expert 5 split in 2, + expert 6
    assert 0 < float(metrics.balancedness(pr)[0]) <= 1
    rows = metrics.summary(r, expert_to_node=metrics.contiguous_map(E, 4))
    assert len(rows) == len(r.layers) and "nodes_per_token" in rows[0]


def test_sglang_foreign_dump_without_dsv3lab_keys():
    k, L, E = 2, 3, 8
    recs = [dict(forward_pass_id=p, rank=0, input_ids=torch.tensor([1, 2, 3]), positions=torch.tensor([0, 1, 2]) + 3 * p,
                 forward_mode="extend", topk_ids_of_layer=torch.cat([torch.full((1, 3, k), -1),
                                                                      torch.randint(0, E, (2, 3, k))]),
                 global_physical_count=torch.zeros(L, E, dtype=torch.int64)) for p in range(2)]
    rec = formats.from_sglang(dict(records=recs, last_physical_to_logical_map=None))
    assert rec["meta"]["layers"] == [1, 2] and rec["meta"]["n_routed_experts"] == E
    assert rec["tensors"]["topk_ids"].shape == (2, 6, k)
    assert torch.isnan(rec["tensors"]["topk_weights"]).all() and rec["tensors"]["seq"].eq(0).all()
    from dsv3lab.probes.trace import Routing
    assert int(Routing(rec).expert_load().sum()) == 2 * 6 * k


def _gather_rank(rank, world, port, path, out):
    import torch.distributed as dist
    from dsv3lab.probes.trace import gather
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rec = formats.load_trace(path)
        rec["tensors"]["topk_ids"] = rec["tensors"]["topk_ids"] + 0 * rank
        got = gather(rec, contribute=(rank != 2))         # rank 2 plays a TP peer holding a copy
        if rank == 0:
            formats.save_trace(got, out)
        else:
            assert got is None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_to_rank0_over_gloo(record, tmp_path):
    import socket
    import torch.multiprocessing as mp
    path, out = str(tmp_path / "r.safetensors"), str(tmp_path / "merged.safetensors")
    formats.save_trace(record, path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_rank, args=(3, port, path, out), nprocs=3, join=True)
    got = formats.load_trace(out)
    n = record["tensors"]["token_ids"].numel()
    assert torch.equal(got["tensors"]["rank"], torch.tensor([0] * n + [1] * n))
    assert torch.equal(got["tensors"]["topk_ids"], torch.cat([record["tensors"]["topk_ids"]] * 2, dim=1))


def _trace_rank(rank, world, layout, tokens):
    from dsv3lab.parallel import Layout, ParallelContext, apply_layout, serve
    from dsv3lab.parallel.dispatch import chunk_sizes
    from dsv3lab.probes.trace import gather
    ctx = ParallelContext.init(Layout(**layout))
    model = apply_layout(dsv3lab.build("tiny", seed=1), ctx)
    sizes = chunk_sizes(tokens.shape[0], ctx.layout.dp)
    lo = sum(sizes[:ctx.dp_rank])
    mine = tokens[lo:lo + sizes[ctx.dp_rank]]
    with torch.no_grad(), trace(model) as t:
        if mine.shape[0]:
            model(mine)
        serve(model)
    return gather(t.record(), contribute=(ctx.tp_rank == 0))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tp=1, ep=2, dp=2), dict(tp=2, ep=2, dp=1)], ids=["ep2-dp2", "tp2-ep2"])
def test_trace_in_the_multi_rank_engine(layout):
    """Multi-rank runs (gloo, 2 ranks): the trace gathered on rank 0 equals the single-process
    trace of the whole batch (TP peers contribute one copy)."""
    from dsv3lab.parallel import spawn
    tokens = _tokens(3, 5, seed=4)
    ref_model = dsv3lab.build("tiny", seed=1)
    with torch.no_grad(), trace(ref_model) as ref:
        ref_model(tokens)
    got = spawn(_trace_rank, 2, layout, tokens)
    from dsv3lab.probes.trace import Routing
    r = Routing(got)
    assert torch.equal(r.topk_ids, ref.routing.topk_ids)
    assert torch.equal(r.token_ids, tokens.reshape(-1))
    assert got["tensors"]["rank"].tolist() == ([0] * 10 + [1] * 5 if layout["dp"] == 2 else [0] * 15)


@pytest.mark.parametrize("method,scoring", [("noaux_tc", "sigmoid"), ("greedy", "softmax"),
                                            ("group_limited_greedy", "softmax"), ("group_top2", "softmax")])
def test_gate_steps_recomputes_each_routers_choice(method, scoring):
    """probes.gate.gate_steps (the notebook's step-by-step router) chooses what the model's Gate
    chooses under every topk_method (Gate is checked against transformers' routers per model type),
    with several groups: "greedy" keeps every group whatever n_group says."""
    from dsv3lab.model.moe import Gate
    from dsv3lab.probes.gate import gate_steps
    cfg = dsv3lab.ModelConfig.preset("tiny").replace(topk_method=method, scoring_func=scoring, n_group=4, topk_group=2,
                                            norm_topk_prob=method != "greedy")
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.1)
    x = torch.randn(64, cfg.hidden_size, generator=g)
    ids, weights = gate(x)
    steps = gate_steps(x, gate.weight, gate.e_score_correction_bias, cfg)
    assert torch.equal(steps["topk_ids"].sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(steps["topk_weights"].gather(1, steps["topk_ids"].argsort(-1)),
                               weights.gather(1, ids.argsort(-1)), rtol=1e-5, atol=1e-6)
    assert bool(steps["group_mask"].all()) == (method == "greedy")
