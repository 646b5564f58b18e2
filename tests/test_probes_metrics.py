"""Balance metrics and losses against hand computations; the per-pass routing recorder; the gate
utilities (dsv3lab.probes.metrics, recorder, gate)."""

import pytest
import torch

import dsv3lab
from dsv3lab.probes import metrics, moe_gates, biases_zeroed, run_with_cache
from dsv3lab.probes.recorder import RoutingRecorder
from dsv3lab.probes.trace import Routing


# Two sequences of T = 2 tokens, E = 4 experts, k = 2 (values chosen so every sum is exact).
S1 = [[0.9, 0.5, 0.1, 0.5], [0.2, 0.2, 0.4, 0.2]]       # row sums 2.0 and 1.0
IDS1 = [[0, 1], [2, 0]]                                  # load [2, 1, 1, 0]
S2 = [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]
IDS2 = [[0, 1], [2, 3]]                                  # load [1, 1, 1, 1]


def _batch():
    return torch.tensor(S1 + S2, dtype=torch.float64), torch.tensor(IDS1 + IDS2)


def test_max_vio_by_hand():
    # (max - mean) / mean: [3,1,1,3] -> (3-2)/2; [2,1,1,0] -> (2-1)/1; even -> 0
    got = metrics.max_vio(torch.tensor([[3, 1, 1, 3], [2, 1, 1, 0], [5, 5, 5, 5]]))
    assert torch.allclose(got, torch.tensor([0.5, 1.0, 0.0]))
    assert float(metrics.max_vio(torch.zeros(4))) == 0.0            # no tokens: 0, not NaN


def _record(steps):
    """A one-layer record from [(topk_ids [N,k], positions [N], seq [N])] per step, E = 4, k = 2."""
    ids = torch.cat([torch.tensor(s[0]) for s in steps])[None]
    pos = torch.cat([torch.tensor(s[1]) for s in steps])
    seq = torch.cat([torch.tensor(s[2]) for s in steps])
    step = torch.cat([torch.full((len(s[1]),), i) for i, s in enumerate(steps)])
    t = dict(topk_ids=ids, topk_weights=torch.ones(ids.shape), token_ids=torch.zeros_like(pos),
             positions=pos, seq=seq, step=step)
    return dict(tensors=t, meta=dict(layers=[1], n_routed_experts=4, top_k=2, n_group=1, mtp_depths=[]))


def test_max_vio_per_batch_and_global_by_hand():
    # pass 0: prefill of 2 tokens -> load [2,1,1,0], MaxVio 1; pass 1: one decode token -> [0,1,0,1],
    # mean 0.5, MaxVio 1; whole trace [2,2,1,1], mean 1.5, MaxVio 1/3
    r = Routing(_record([(IDS1, [0, 1], [0, 0]), ([[3, 1]], [2], [0])]))
    assert torch.allclose(metrics.max_vio_per_batch(r), torch.tensor([[1.0], [1.0]]))
    assert torch.allclose(metrics.max_vio_global(r), torch.tensor([1 / 3]))
    assert torch.equal(metrics.sequence_ids(r), torch.tensor([0, 0, 0]))   # decode continues its row


def test_sequence_balance_loss_by_hand():
    s, ids = _batch()
    # sequence 1: P = mean of s/sum s = [0.325, 0.225, 0.225, 0.225]; f = 4/(2*2) * [2,1,1,0];
    # sum f P = 0.65 + 0.225 + 0.225 = 1.1. Sequence 2 is uniform: f = 1, P = 1/4, sum f P = 1.
    one = metrics.sequence_balance_loss(s[:2], ids[:2], batch=1, top_k=2, alpha=1.0)
    assert float(one) == pytest.approx(1.1, abs=1e-12)
    both = metrics.sequence_balance_loss(s, ids, batch=2, top_k=2, alpha=1.0)
    assert float(both) == pytest.approx((1.1 + 1.0) / 2, abs=1e-12)
    # the report's alpha = 1e-4 by default; leading dims (layers) are kept
    assert float(metrics.sequence_balance_loss(s, ids, 2, 2)) == pytest.approx(1.05e-4, rel=1e-12)
    per_layer = metrics.sequence_balance_loss(torch.stack([s, s.flip(0)]), torch.stack([ids, ids.flip(0)]), 2, 2, 1.0)
    assert per_layer.shape == (2,) and torch.allclose(per_layer, torch.tensor([1.05, 1.05], dtype=torch.float64))
    with pytest.raises(ValueError, match="equal sequences"):
        metrics.sequence_balance_loss(s[:3], ids[:3], 2, 2)


def test_batch_balance_loss_by_hand():
    s, ids = _batch()
    # all 4 tokens as one sequence: load [3,2,2,1], f = 4/(2*4) * load = [1.5,1,1,0.5];
    # P = column means of the 4 normalised rows = [1.15, 0.95, 0.95, 0.95] / 4
    # sum f P = 1.5*0.2875 + 0.2375 + 0.2375 + 0.5*0.2375 = 1.025
    got = metrics.batch_balance_loss(s, ids, top_k=2, alpha=1.0)
    assert float(got) == pytest.approx(1.025, abs=1e-12)
    assert float(got) != pytest.approx(float(metrics.sequence_balance_loss(s, ids, 2, 2, 1.0)))


def test_balance_loss_gradient_by_hand():
    # d/ds_{j,t} of (1/T) sum_i f_i s_{i,t} / S_t = (1/T) (f_j / S_t - sum_i f_i s_{i,t} / S_t^2);
    # sequence 1, token 0: T = 2, S = 2, f = [2,1,1,0], sum f s = 2.4 -> [0.2, -0.05, -0.05, -0.3]
    s = torch.tensor(S1, dtype=torch.float64, requires_grad=True)
    metrics.sequence_balance_loss(s, torch.tensor(IDS1), 1, 2, alpha=1.0).backward()
    assert torch.allclose(s.grad[0], torch.tensor([0.2, -0.05, -0.05, -0.3], dtype=torch.float64))
    # token 1: S = 1, sum f s = 0.4 + 0.2 + 0.4 = 1.0 -> 0.5 * (f - 1.0)
    assert torch.allclose(s.grad[1], 0.5 * (torch.tensor([2.0, 1, 1, 0], dtype=torch.float64) - 1.0))


def test_routing_balance_loss_is_the_sequence_loss_of_each_request():
    # one pass of two rows (two requests of 2 tokens), two identical layers
    rec = _record([(IDS1 + IDS2, [0, 1, 0, 1], [0, 0, 1, 1])])
    t = rec["tensors"]
    t["topk_ids"] = t["topk_ids"].repeat(2, 1, 1)
    t["topk_weights"] = t["topk_weights"].repeat(2, 1, 1)
    t["scores"] = torch.tensor(S1 + S2, dtype=torch.float32)[None].repeat(2, 1, 1)
    rec["meta"]["layers"] = [1, 2]
    got = metrics.routing_balance_loss(Routing(rec), alpha=1.0)
    assert got.dtype == torch.float32 and torch.allclose(got, torch.tensor([1.05, 1.05]))
    del t["scores"]
    with pytest.raises(ValueError, match="scores=True"):
        metrics.routing_balance_loss(Routing(rec))


def test_balancedness_one_definition():
    from dsv3lab.balance import balancedness as from_balance
    from dsv3lab.balance.eplb import balancedness as from_eplb
    assert from_balance is metrics.balancedness and from_eplb is metrics.balancedness
    got = metrics.balancedness(torch.tensor([[8.0, 4.0], [3.0, 3.0]]))
    assert got.dtype == torch.float64 and torch.allclose(got, torch.tensor([0.75, 1.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# the recorder and the gate utilities, on the tiny model
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    m = dsv3lab.build("tiny", seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for gate in moe_gates(m):
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.05)
    return m


def test_recorder_matches_hook_points_and_keeps_the_graph(tiny):
    cfg = tiny.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    _, cache = run_with_cache(tiny, tokens, "layers.*.mlp.gate.hook_topk_ids")
    with RoutingRecorder(tiny, scores=True) as rec:
        tiny(tokens)
    gates = moe_gates(tiny)
    assert len(rec.gates) == len(gates) == cfg.n_moe_layers + cfg.num_nextn_predict_layers
    named = rec.named_topk_ids()
    assert set(named) == set(cache)                                   # the main gates ran, MTP did not
    for name, ids in named.items():
        assert torch.equal(ids, cache[name])
    counts = rec.counts()
    assert len(counts) == cfg.n_moe_layers
    assert all(int(c.sum()) == tokens.numel() * cfg.num_experts_per_tok for c in counts)
    i = next(j for j, ids in enumerate(rec.topk_ids) if ids is not None)
    assert rec.scores[i].requires_grad                                 # not detached
    loss = metrics.sequence_balance_loss(rec.scores[i], rec.topk_ids[i], 2, cfg.num_experts_per_tok)
    loss.backward()
    assert rec.gates[i].weight.grad is not None and float(rec.gates[i].weight.grad.abs().sum()) > 0
    tiny.zero_grad(set_to_none=True)
    before = list(rec.topk_ids)
    tiny(tokens[:, :3])                                               # after the block: no hooks left
    assert all(a is b for a, b in zip(before, rec.topk_ids))
    rec.reset()
    assert all(x is None for x in rec.topk_ids + rec.scores)


def test_biases_zeroed_restores_exactly(tiny):
    saved = [g.e_score_correction_bias.clone() for g in moe_gates(tiny)]
    assert any(bool(b.ne(0).any()) for b in saved)
    with pytest.raises(RuntimeError, match="inside"):
        with biases_zeroed(tiny):
            assert all(bool((g.e_score_correction_bias == 0).all()) for g in moe_gates(tiny))
            raise RuntimeError("inside")
    assert all(torch.equal(g.e_score_correction_bias, b) for g, b in zip(moe_gates(tiny), saved))
    from dsv3lab.balance import biases_zeroed as from_balance
    assert from_balance is biases_zeroed
