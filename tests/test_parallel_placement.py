"""Redundant experts executed: EPLB placements (hierarchical, global, two copies of one expert on
one rank) served by the multi-rank engine over gloo give the unreplicated outputs, and every
rank computes exactly the pairs a hand-written replay of the routing trace through the placement
says it should."""

import pytest
import torch

import dsv3lab
from dsv3lab.balance.eplb import rebalance_experts
from dsv3lab.parallel import Layout, LayoutError, apply_layout, spawn
from dsv3lab.parallel.dispatch import chunk_sizes
from dsv3lab.parallel.placement import ExpertPlacement, ReplicaMap
from dsv3lab.parallel.runs import rank_runs, single_run

CFG = dsv3lab.ModelConfig.preset("tiny")          # E = 16, k = 4, 4 groups, MoE layers 1, 2 (+ MTP 3)
E, K = CFG.n_routed_experts, CFG.num_experts_per_tok
MOE = list(range(CFG.first_k_dense_replace, CFG.num_hidden_layers))
TOKENS = torch.randint(0, CFG.vocab_size, (4, 7), generator=torch.Generator().manual_seed(5))
NEW = 4


# --- the replica choice, by hand ---------------------------------------------------------------

def slot_by_hand(row: list[int], ids: list[int], sender: int) -> list[int]:
    """The documented rule, one pair at a time: the n-th pair (in token order) a sender routes to
    expert e goes to replica (n + sender) % copies(e), replicas in slot order."""
    replicas = {e: [s for s, x in enumerate(row) if x == e] for e in set(row)}
    seen = {}
    out = []
    for e in ids:
        n = seen.get(e, 0)
        seen[e] = n + 1
        out.append(replicas[e][(n + sender) % len(replicas[e])])
    return out


def test_choose_matches_the_rule_by_hand():
    g = torch.Generator().manual_seed(0)
    row = list(range(E)) + [3, 3, 9, 0]                 # 3 copies of expert 3, 2 of 9 and 0
    rmap = ReplicaMap(torch.tensor(row), E, 4)
    assert rmap.count[3] == 3 and rmap.count[1] == 1 and rmap.log2phy[3].tolist() == [3, 16, 17]
    for sender in range(4):
        ids = torch.randint(0, E, (40,), generator=g)
        ids[::3] = 3                                      # make expert 3 hot
        assert rmap.choose(ids, sender).tolist() == slot_by_hand(row, ids.tolist(), sender)
    # a hot expert's pairs are spread evenly over its replicas
    got = rmap.choose(torch.full((30,), 3), 1)
    assert torch.bincount(got, minlength=20)[[3, 16, 17]].tolist() == [10, 10, 10]
    # no replicas: the slot is the expert
    plain = ReplicaMap(torch.arange(E), E, 2)
    assert torch.equal(plain.choose(ids, 1), ids)


def test_placement_is_checked():
    with pytest.raises(LayoutError, match="expert.*no physical slot"):
        ExpertPlacement({1: torch.tensor([0] * 16)}).validate(CFG, 2, MOE)
    with pytest.raises(LayoutError, match="multiple of ep=2"):
        ExpertPlacement({1: torch.arange(17) % 16}).validate(CFG, 2, MOE)
    with pytest.raises(LayoutError, match="not an MoE layer"):
        ExpertPlacement({0: torch.arange(16)}).validate(CFG, 2, MOE)
    with pytest.raises(LayoutError, match="outside"):
        ExpertPlacement({1: torch.arange(16) + 1}).validate(CFG, 2, MOE)
    with pytest.raises(LayoutError, match="ExpertPlacement"):
        ExpertPlacement.from_eplb(torch.zeros(3, 16, dtype=torch.long), MOE)
    with pytest.raises(LayoutError, match="fp8_dispatch.*alltoall"):
        Layout(tp=2, ep=2, moe_comm="allreduce", fp8_dispatch=True).check_world(2)


def test_replicas_are_read_once_per_rank(tmp_path):
    """Placed without processes: a rank holds (and reads) each expert of its slots once, two
    slots of one expert included, and nothing else."""
    from dsv3lab.parallel import load_sharded, param_bytes
    from dsv3lab.parallel.loading import CountingReader
    path = dsv3lab.save(dsv3lab.build("tiny", seed=1), str(tmp_path / "ckpt"))
    row = torch.tensor(list(range(E)) + [5, 5, 12, 2])   # rank 1 of 2: slots 10..19 hold 5 twice
    pl = ExpertPlacement({l: row for l in MOE})
    for rank in range(2):
        reader = CountingReader(path)
        seen = []
        get = reader.get
        reader.get = lambda key, rows=None, cols=None: (seen.append(key), get(key, rows=rows, cols=cols))[1]
        m = load_sharded(path, Layout(tp=1, ep=2, dp=2), rank=rank, reader=reader, placement=pl)
        assert reader.bytes_read == param_bytes(m)
        slots = row[rank * 10:(rank + 1) * 10].tolist()
        for layer in MOE:
            keys = [k for k in seen if f"layers.{layer}.mlp.experts." in k]
            experts = [int(k.split(".experts.")[1].split(".")[0]) for k in keys]
            assert sorted(set(experts)) == sorted(set(slots))
            assert len(keys) == 3 * len(set(slots))                 # gate, up, down: once each
            moe = m.layers[layer].mlp
            assert [e for e in range(E) if moe.experts[e] is not None] == sorted(set(slots))
            assert moe.dispatch.slot_expert == slots


# --- multi-rank runs ---------------------------------------------------------------------------

def _placements(load: torch.Tensor, ep: int) -> dict:
    """Placements of the traced load [layers, E] on ``ep`` ranks: EPLB hierarchical (2 nodes,
    whole groups per node) and global, each with 4 redundant slots, and a hand-made one that
    puts two copies of the hottest expert on one rank."""
    hier, _, _ = rebalance_experts(load, E + 4, CFG.n_group, 2, ep)
    glob, _, _ = rebalance_experts(load, E + 4, 1, 2, ep)
    assert not torch.equal(hier, glob)
    hot = int(load.sum(0).argmax())
    per = (E + ep) // ep
    twice = []
    for layer in range(load.shape[0]):
        row = list(range(E)) + [hot] * ep             # rank ep-1's slots end with ep copies of `hot`
        twice.append(row)
    twice = torch.tensor(twice)
    assert (twice[:, (ep - 1) * per:] == hot).sum(1).min() >= 2
    return dict(hierarchical=hier, global_=glob, two_on_one_rank=twice)


def expected_slot_rows(topk_ids: dict, placement: ExpertPlacement, layout: Layout, n_rows: int, seq: int):
    """{layer: [world][slots per rank]} pairs each rank's slots compute, replayed from the trace
    (every DP group's [tokens, k] ids in order) one pair at a time."""
    W = layout.world_size
    out = {}
    for name, ids in topk_ids.items():
        layer = int(name.split(".")[1])
        row = placement.row(layer, E).tolist()
        per = len(row) // layout.ep
        rows = [[0] * per for _ in range(W)]
        lo = 0
        for d, n in enumerate(chunk_sizes(n_rows, layout.dp)):
            group = ids[lo:lo + n * seq]
            lo += n * seq
            c0 = 0
            for i, c in enumerate(chunk_sizes(group.shape[0], layout.tp)):
                sender = d * layout.tp + i
                chunk = group[c0:c0 + c].reshape(-1).tolist()
                c0 += c
                base = (sender // layout.ep) * layout.ep
                for s in slot_by_hand(row, chunk, sender % layout.ep):
                    rows[base + s // per][s % per] += 1
        out[layer] = rows
    return out


@pytest.fixture(scope="module")
def reference():
    return single_run("tiny", TOKENS, max_new_tokens=NEW, seed=1)


def _check_same(out, ref, what):
    for k, ids in ref["topk_ids"].items():
        assert torch.equal(out["topk_ids"][k], ids), f"{what}: routing differs at {k}"
    rel = ((out["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max()).item()
    assert rel < 1e-5, (what, rel)
    assert out["generated"] == ref["generated"], what


@pytest.mark.parametrize("world,layouts", [
    (2, [dict(tp=2, ep=2), dict(tp=1, ep=2, dp=2, moe_comm="allreduce")]),
    (4, [dict(tp=2, ep=4, dp=2), dict(tp=4, ep=4, moe_comm="allreduce")]),
], ids=["w2", "w4"])
def test_replicated_placements_match_and_counts_replay(world, layouts, reference):
    ref_load = torch.stack([torch.bincount(ids.reshape(-1), minlength=E) for ids in reference["topk_ids"].values()])
    runs, meta = [], []
    for lay in layouts:
        for kind, phy2log in _placements(ref_load, lay["ep"]).items():
            pl = ExpertPlacement.from_eplb(phy2log, MOE)
            runs.append(dict(source="tiny", layout=lay, tokens=TOKENS, max_new_tokens=NEW, seed=1, placement=pl))
            meta.append((lay, kind, pl))
    outs = spawn(rank_runs, world, runs)
    for out, (lay, kind, pl) in zip(outs, meta):
        what = f"{lay} {kind}"
        _check_same(out, reference, what)
        layout = Layout(**lay)
        want = expected_slot_rows(out["topk_ids"], pl, layout, TOKENS.shape[0], TOKENS.shape[1])
        for layer in MOE:
            got = [r["forward_comm"][MOE.index(layer)]["slot_rows"] for r in out["ranks"]]
            assert got == want[layer], f"{what}: layer {layer} slot rows {got} != replay {want[layer]}"
            # each rank holds the experts of its slots, in slot order
            per = pl.row(layer, E).numel() // layout.ep
            for r in out["ranks"]:
                j = r["rank"] % layout.ep
                assert r["slots"][layer] == pl.row(layer, E)[j * per:(j + 1) * per].tolist()
        # every (token, expert) pair of the forward was computed exactly once in the world
        assert sum(c["rows_computed"] for r in out["ranks"] for c in r["forward_comm"]) == TOKENS.numel() * K * len(MOE)


# --- live re-placement -------------------------------------------------------------------------

def test_live_replacement_keeps_outputs_and_balances(tmp_path):
    """TP2 x DP2 x EP4: trace a window, plan with EPLB (4 redundant slots), swap the placement in
    the running model (moved experts re-read from the checkpoint, nothing else), run the window
    again: same logits and greedy ids; the dispatchers' per-rank counts equal EPLB's prediction
    before (no replicas: exact) and the replay of the trace through the new placement after."""
    from dsv3lab.parallel.runs import rebalance_run
    from dsv3lab.probes.metrics import balancedness
    path = dsv3lab.save(dsv3lab.build("tiny", seed=1), str(tmp_path / "ckpt"))
    lay = dict(tp=2, ep=4, dp=2)
    out = spawn(rebalance_run, 4, path, lay, TOKENS, redundant=4, max_new_tokens=NEW, dtype=torch.float32)
    rel = ((out["logits_after"] - out["logits_before"]).abs().max() / out["logits_before"].abs().max()).item()
    assert rel < 1e-5
    assert out["generated_after"] == out["generated_before"]
    layout = Layout(**lay)
    assert out["load"].shape == (len(MOE), E) and int(out["load"].sum()) == TOKENS.numel() * K * len(MOE)
    assert torch.equal(out["measured_before"].double(), out["predicted_before"])
    topk = {f"layers.{l}.mlp.gate.hook_topk_ids": out["topk_ids"][i] for i, l in enumerate(MOE)}
    want = expected_slot_rows(topk, out["placement"], layout, TOKENS.shape[0], TOKENS.shape[1])
    assert out["measured_after"].tolist() == [[sum(r) for r in want[l]] for l in MOE]
    # EPLB's even split per replica vs the dispatcher's round-robin: within a few pairs per rank
    assert (out["measured_after"] - out["predicted_after"]).abs().max() <= 4
    assert (balancedness(out["measured_after"]) > balancedness(out["measured_before"])).all()
    # only moved experts were read: 3 weights of [64, 32] fp32 each
    expert_bytes = 3 * CFG.hidden_size * CFG.moe_intermediate_size * 4
    for rank, moved in enumerate(out["moved"]):
        ep_rank = rank % 4
        per = (E + 4) // 4
        for i, layer in enumerate(MOE):
            old = set(range(ep_rank * 4, ep_rank * 4 + 4))
            new = set(out["placement"].row(layer, E)[ep_rank * per:(ep_rank + 1) * per].tolist())
            assert {e for l, e in moved["loaded"] if l == layer} == new - old
            assert {e for l, e in moved["dropped"] if l == layer} == old - new
        assert moved["bytes_read"] == len(moved["loaded"]) * expert_bytes
