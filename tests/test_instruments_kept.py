"""The instruments on a model as the released sizes are run: weights kept FP8 as stored and routed
experts paged from disk. Traces, load heatmaps, logit lens, replay and ablation see what they see on
the model held whole; and ``probes.routing_diff.routing_flips`` counts the routing decisions FP8
changes (notebook 03's question, asked of a checkpoint), checked here against hand-counted cases."""

import pytest
import torch

import dsv3lab
from lab_models import tiny_with_biases
from dsv3lab.viz.figures import expert_load_heatmap
from dsv3lab.probes import trace
from dsv3lab.probes.routing_diff import routing_flips
from dsv3lab.probes.trace import Routing


_biased = tiny_with_biases


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("kept")
    m = _biased(5)
    return dict(fp8=dsv3lab.save(m, d / "fp8", fp8=True), bf16=dsv3lab.save(m.to(torch.bfloat16), d / "bf16"))


@pytest.fixture(scope="module")
def models(ckpts):
    whole = dsv3lab.load(ckpts["fp8"], dtype=torch.float32, fp8="dequant")
    kept = dsv3lab.load(ckpts["fp8"], dtype=torch.float32, fp8="keep")
    cfg = whole.cfg
    s = whole._dsv3_load
    w = whole.layers[-1].mlp.experts[0].up_proj.weight
    routed = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if ".experts." in n)
    cap = (s["mapped"] + s["own"] - routed + 3 * cfg.num_experts_per_tok * 3 * w.numel() * w.element_size()) / 1e9
    paged = dsv3lab.load(ckpts["fp8"], dtype=torch.float32, fp8="keep", max_memory=cap)
    yield dict(whole=whole, kept=kept, paged=paged)
    paged.pager.close()


TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("which", ["kept", "paged"])
def test_trace_heatmap_lens_replay_ablation_as_on_the_whole_model(models, which):
    whole, m = models["whole"], models[which]
    with torch.no_grad():
        with trace(whole) as tw:
            whole(TOKENS)
        with trace(m) as tm:
            m(TOKENS)
        assert torch.equal(tm.routing.topk_ids, tw.routing.topk_ids)
        assert torch.equal(tm.routing.expert_load(), tw.routing.expert_load())
        fig = expert_load_heatmap(tm.routing.expert_load())
        assert len(fig.axes) >= 1
        torch.testing.assert_close(dsv3lab.logit_lens(m, TOKENS), dsv3lab.logit_lens(whole, TOKENS),
                                   rtol=0, atol=1e-5)
        # replay another model's routing: the gates' own choice is overridden everywhere
        other = _biased(9).float()
        with trace(other) as to:
            other(TOKENS)
        with dsv3lab.replay(m, to.routing), trace(m) as tr:
            replayed = m(TOKENS)
        assert torch.equal(tr.routing.topk_ids, to.routing.topk_ids)
        with dsv3lab.replay(whole, to.routing):
            torch.testing.assert_close(replayed, whole(TOKENS), rtol=0, atol=1e-5)
        layer = whole.cfg.first_k_dense_replace
        busiest = int(tw.routing.expert_load()[0].argmax())
        with dsv3lab.ablate_experts(m, {layer: [busiest]}, mode="reroute"), trace(m) as ta:
            ablated = m(TOKENS)
        assert not (ta.routing.topk_ids[0] == busiest).any()
        with dsv3lab.ablate_experts(whole, {layer: [busiest]}, mode="reroute"):
            torch.testing.assert_close(ablated, whole(TOKENS), rtol=0, atol=1e-5)


def test_fp8_routing_flips_of_a_bf16_release_quantized_at_load(ckpts):
    bf16 = dsv3lab.load(ckpts["bf16"], dtype=torch.bfloat16)
    fp8 = dsv3lab.load(ckpts["bf16"], dtype=torch.bfloat16, fp8="quantize")
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with trace(bf16) as a:
            bf16(tokens)
        with trace(bf16) as again:
            bf16(tokens)
        with trace(fp8) as b:
            fp8(tokens)
    same = routing_flips(a.routing, again.routing)
    assert same["tokens_changed"] == same["choices_changed"] == same["weight_change"] == 0.0
    d = routing_flips(a.routing, b.routing)
    assert d["tokens"] == 4 * 32 and d["layers"] == len(a.routing.layers)
    assert 0 < d["choices_changed"] <= d["tokens_changed"] < 1          # FP8 moves some, not most
    assert [r["layer"] for r in d["per_layer"]] == a.routing.layers
    mean_tokens = sum(r["tokens_changed"] for r in d["per_layer"]) / len(d["per_layer"])
    assert abs(mean_tokens - d["tokens_changed"]) < 1e-9


def _routing(ids, weights=None, token_ids=None):
    ids = torch.tensor(ids)
    L, N, k = ids.shape
    tensors = dict(topk_ids=ids, topk_weights=torch.full((L, N, k), 0.5) if weights is None else torch.tensor(weights),
                   token_ids=torch.arange(N) if token_ids is None else torch.tensor(token_ids),
                   positions=torch.arange(N))
    return Routing(dict(tensors=tensors, meta=dict(layers=list(range(1, L + 1)), n_routed_experts=8, top_k=k)))


def test_routing_flips_counted_by_hand():
    a = _routing([[[0, 1], [2, 3], [4, 5]], [[0, 1], [2, 3], [4, 5]]],
                 weights=[[[0.6, 0.4]] * 3, [[0.5, 0.5]] * 3])
    b = _routing([[[1, 0], [2, 7], [6, 7]], [[0, 1], [2, 3], [4, 5]]],
                 weights=[[[0.3, 0.7], [0.5, 0.5], [0.5, 0.5]], [[0.5, 0.5]] * 3])
    d = routing_flips(a, b)
    # layer 1: token 0 same set (order swapped), token 1 one slot moved, token 2 both moved
    assert d["per_layer"][0] == dict(layer=1, tokens_changed=2 / 3, choices_changed=3 / 6)
    assert d["per_layer"][1] == dict(layer=2, tokens_changed=0.0, choices_changed=0.0)
    assert d["tokens_changed"] == pytest.approx(2 / 6) and d["choices_changed"] == pytest.approx(3 / 12)
    # weights of experts both chose: layer 1 token 0 |0.6-0.7| + |0.4-0.3|, token 1 expert 2 |0.6-0.5|;
    # layer 2 all equal: (0.1 + 0.1 + 0.1 + 0) / 9 shared (token, expert) pairs
    assert d["weight_change"] == pytest.approx(0.3 / 9)


def test_routing_flips_refuses_different_tokens():
    a = _routing([[[0, 1], [2, 3]]])
    with pytest.raises(ValueError, match="not of the same tokens .token_ids differ at 1 places"):
        routing_flips(a, _routing([[[0, 1], [2, 3]]], token_ids=[0, 5]))
    with pytest.raises(ValueError, match=r"differ in shape \[layers, tokens, top_k\]"):
        routing_flips(a, _routing([[[0, 1], [2, 3], [4, 5]]]))
