"""dsv3lab.train on the tiny preset: the loss falls, the aux-loss-free bias update moves against
load and touches nothing else, seeds reproduce runs, the tokenizer round-trips, logs are atomic."""

import dataclasses
import json
import os

import pytest
import torch

import dsv3lab
from dsv3lab import train as T

CFG = dsv3lab.ModelConfig.preset("tiny")
TC = T.TrainConfig(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=6,
                   eval_batches=1, threads=1)


@pytest.fixture(scope="module")
def corpus():
    docs = T.python_docs_corpus(docstrings=False)[:12]
    train_docs, val_docs = T.split_documents(docs, 0.2, seed=0)
    tok = T.train_tokenizer(train_docs, CFG.vocab_size)
    return tok, T.encode_documents(tok, train_docs), T.encode_documents(tok, val_docs)


def test_split_is_by_document_and_seeded():
    docs = [f"doc {i}" for i in range(40)]
    tr, va = T.split_documents(docs, 0.1, seed=3)
    assert len(va) == 4 and not set(tr) & set(va) and sorted(tr + va) == sorted(docs)
    assert T.split_documents(docs, 0.1, seed=3) == (tr, va)


def test_tokenizer_round_trips_and_specials(corpus):
    tok, train_ids, _ = corpus
    assert tok.get_vocab_size() == CFG.vocab_size
    assert tok.token_to_id(T.BOS) == CFG.bos_token_id and tok.token_to_id(T.EOS) == CFG.eos_token_id
    for text in ["The list is a mutable sequence.\n\n  x = [1, 2]\t# ok",
                 "naïve café — 日本語 🙂 \x00 bytes never seen in training"]:
        assert tok.decode(tok.encode(text).ids) == text
    assert int(train_ids.max()) < CFG.vocab_size
    assert (train_ids == CFG.eos_token_id).sum() >= 1


def test_lr_schedule():
    tc = dataclasses.replace(TC, steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert T.lr_at(0, tc) == pytest.approx(0.1)
    assert T.lr_at(9, tc) == pytest.approx(1.0)
    assert T.lr_at(10, tc) == pytest.approx(1.0)
    assert T.lr_at(100, tc) == pytest.approx(0.1)
    lrs = [T.lr_at(s, tc) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_max_violation():
    from dsv3lab.probes.metrics import max_vio         # the loop's MaxVio (one definition)
    assert float(max_vio(torch.tensor([4, 4, 4, 4]))) == 0.0
    assert float(max_vio(torch.tensor([8, 0, 0, 0]))) == pytest.approx(3.0)
    assert float(max_vio(torch.tensor([6, 2, 2, 2]))) == pytest.approx(1.0)


def test_bias_update_moves_against_load():
    gate = dsv3lab.build(CFG, seed=0).layers[1].mlp.gate
    counts = torch.tensor([40, 10, 25, 25] + [25] * 12)             # mean 25
    delta = T.bias_update(gate, counts, gamma=0.01)
    b = gate.e_score_correction_bias
    assert b[0] == pytest.approx(-0.01)            # overloaded -> down
    assert b[1] == pytest.approx(0.01)             # underloaded -> up
    assert (b[2:] == 0).all()                      # at the mean -> unchanged
    assert delta.sum() == pytest.approx(0.0)
    # centred form: the steps sum to zero even when the signs do not balance
    gate.e_score_correction_bias.zero_()
    counts = torch.tensor([40] + [24] * 15)
    d = T.bias_update(gate, counts, gamma=0.01, centred=True)
    assert float(d.sum()) == pytest.approx(0.0, abs=1e-7)
    assert d[0] < 0 and (d[1:] > 0).all()


def test_bias_is_selection_only():
    """A bias changes which experts are chosen, never the weights of the chosen ones, and the
    training-time update touches no parameter (lr = 0 isolates it)."""
    model = dsv3lab.build(CFG, seed=0)
    gate = model.layers[1].mlp.gate
    x = torch.randn(64, CFG.hidden_size)
    gate.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, CFG.n_routed_experts))
    ids, w = gate(x)
    s = torch.sigmoid(x @ gate.weight.T)
    chosen = s.gather(1, ids)
    torch.testing.assert_close(w, chosen / chosen.sum(-1, keepdim=True) * CFG.routed_scaling_factor)

    tokens = torch.randint(2, CFG.vocab_size, (2000,), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc = dataclasses.replace(TC, steps=2, lr=0.0, bias_gamma=0.01)
    model, _ = T.train(CFG, tokens, None, tc, model=model, progress=False)
    for k, v in model.state_dict().items():
        if k.endswith("e_score_correction_bias"):
            assert not torch.equal(v, before[k]), k
        else:
            assert torch.equal(v, before[k]), k


def test_bias_step_follows_the_counted_load(corpus):
    _, train_ids, _ = corpus
    model = dsv3lab.build(CFG, seed=0).train()
    window = T.sample_windows(train_ids, 4, 34, torch.Generator().manual_seed(0))
    with T.RoutingRecorder(model) as rec:
        T.lm_losses(model, window)
    counts = rec.counts()
    assert len(counts) == len(T.moe_gates(model)) == CFG.n_moe_layers + CFG.num_nextn_predict_layers
    for g, c in zip(rec.gates, counts):
        assert int(c.sum()) == window[:, :32].numel() * CFG.num_experts_per_tok
        T.bias_update(g, c, 0.001)
        b = g.e_score_correction_bias
        assert b[c.argmax()] < 0 and b[c.argmin()] > 0
        assert torch.equal(torch.sign(b), torch.sign(c.float().mean() - c.float()))


def test_sequence_balance_loss():
    E, k, B, S = 8, 2, 2, 16
    # uniform routing and uniform scores: f_i = 1, P_i = 1/E -> sum = 1
    ids = torch.arange(B * S * k).remainder(E).view(B * S, k)
    assert T.sequence_balance_loss(torch.full((B * S, E), 0.5), ids, B, k, alpha=1.0) == pytest.approx(1.0)
    # everything on experts 0 and 1 with scores peaked there -> larger than balanced
    ids = torch.tensor([[0, 1]]).expand(B * S, k)
    s = torch.full((B * S, E), 0.1).index_fill(1, torch.tensor([0, 1]), 0.9).requires_grad_()
    loss = T.sequence_balance_loss(s, ids, B, k, alpha=1.0)
    assert loss > 1.0
    loss.backward()
    assert s.grad[:, 0].mean() > 0                  # pushes the overloaded experts' scores down


def test_loss_falls_and_log_is_complete(corpus, tmp_path):
    _, train_ids, val_ids = corpus
    log_path = tmp_path / "log" / "training_log.jsonl"
    model, log = T.train(CFG, train_ids, val_ids, TC, progress=False, log_path=str(log_path))
    assert not model.training and len(log) == TC.steps
    first = sum(r["loss"] for r in log[:3]) / 3
    last = sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.3, (first, last)
    rows = T.read_jsonl(log_path)
    assert rows == json.loads(json.dumps(log))
    for key in ("step", "loss", "mtp_loss", "lr", "maxvio", "tokens_per_s", "grad_norm"):
        assert all(key in r for r in rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [5, 11]
    assert os.listdir(log_path.parent) == ["training_log.jsonl"]     # no temporary left behind


def test_aux_loss_runs_and_is_logged(corpus):
    _, train_ids, _ = corpus
    tc = dataclasses.replace(TC, steps=2, aux_alpha=1e-2)
    _, log = T.train(CFG, train_ids, None, tc, progress=False)
    assert all(r["aux_loss"] > 0 for r in log)


def test_same_seed_same_run(corpus):
    _, train_ids, _ = corpus
    tc = dataclasses.replace(TC, steps=4)
    m1, l1 = T.train(CFG, train_ids, None, tc, progress=False)
    m2, l2 = T.train(CFG, train_ids, None, tc, progress=False)
    assert [r["loss"] for r in l1] == [r["loss"] for r in l2]
    assert [r["mtp_loss"] for r in l1] == [r["mtp_loss"] for r in l2]
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    _, l3 = T.train(CFG, train_ids, None, dataclasses.replace(tc, seed=1), progress=False)
    assert [r["loss"] for r in l3] != [r["loss"] for r in l1]


def test_write_jsonl_is_atomic(tmp_path, monkeypatch):
    p = tmp_path / "log.jsonl"
    T.write_jsonl(p, [{"step": 0, "loss": 1.5}])
    with pytest.raises(TypeError):
        T.write_jsonl(p, [{"step": 1, "loss": object()}])       # fails while serialising

    def crash(fd):
        raise OSError("disk gone")
    monkeypatch.setattr(os, "fsync", crash)                    # fails after writing, before the swap
    with pytest.raises(OSError):
        T.write_jsonl(p, [{"step": 1, "loss": 1.0}] * 1000)
    monkeypatch.undo()
    assert T.read_jsonl(p) == [{"step": 0, "loss": 1.5}]
    assert os.listdir(tmp_path) == ["log.jsonl"]


def test_train_lab_command_is_registered():
    from dsv3lab.cli import build_parser
    args = build_parser().parse_args(["train-lab", "--out", "x", "--steps", "3"])
    assert args.func is T._cmd_train_lab and args.steps == 3 and args.out == "x"


def test_reflow_joins_prose_only():
    text = "A wrapped\nsentence.\n\n   code = 1\n   more = 2\n\nTitle\n*****\n\nlast\nline"
    assert T.reflow(text) == "A wrapped sentence.\n\n   code = 1\n   more = 2\n\nTitle\n*****\n\nlast line"


def test_lab_corpus_holds_out_the_modules_of_validation_docstrings(monkeypatch):
    from dsv3lab.train import lab_model as LM
    pairs = [("topic:a", "topic a text"), ("topic:b", "topic b text")] + [
        (f"m{i}.py", f"docstring {i} of module m{i}") for i in range(40)]
    sources = [(f"m{i}.py", f"def f{i}():\n    'docstring {i} of module m{i}'\n") for i in range(40)]
    monkeypatch.setattr(LM, "python_docs_with_origin", lambda: pairs)
    monkeypatch.setattr(LM, "stdlib_sources", lambda: sources)
    plain, with_code = LM.lab_corpus(False), LM.lab_corpus(True)
    assert plain["val"] == with_code["val"] and len(plain["val"]) == 2        # 5% of 42 documents
    assert with_code["train"][:len(plain["train"])] == plain["train"]
    held = {o for o, t in pairs if t in set(plain["val"]) and not o.startswith("topic:")}
    for rel, src in sources:
        assert (src in with_code["train"]) == (rel not in held)
        assert (src in with_code["val_code"]) == (rel in held)
    assert with_code["n_source_files"] == 40 - len(held)
    assert not any(v in t for v in plain["val"] for t in with_code["train"])  # no held-out text leaks


def test_text_loss_per_character_by_hand(corpus):
    from dsv3lab.train.heldout import text_loss, unigram_text_loss
    tok, train_ids, _ = corpus
    model = dsv3lab.build(CFG, seed=0)
    docs = ["The list is a mutable sequence type. " * 6, "A tuple is immutable. " * 6]
    got = text_loss(model, tok, docs, seq_len=16)
    ids = T.encode_documents(tok, docs)
    n = ids.numel() // 17
    w = ids[:n * 17].view(n, 17)
    with torch.no_grad():
        logits = model(w[:, :-1])
    total = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
    chars = sum(len(tok.decode([t for t in row if t != CFG.eos_token_id])) + row.count(CFG.eos_token_id)
                for row in w[:, 1:].tolist())
    assert got["tokens"] == n * 16 and got["chars"] == chars
    assert got["nats_per_token"] == pytest.approx(total / (n * 16), rel=1e-5)
    assert got["nats_per_char"] == pytest.approx(total / chars, rel=1e-5)
    uni = unigram_text_loss(tok, train_ids, docs, seq_len=16)
    counts = torch.bincount(train_ids, minlength=tok.get_vocab_size()).double() + 1
    assert uni["nats_per_token"] == pytest.approx(float(-(counts / counts.sum()).log()[w[:, 1:]].mean()))
    with pytest.raises(ValueError, match="fewer than one window"):
        text_loss(model, tok, ["x"], seq_len=64)


def test_assess_a_saved_lab_model(corpus, tmp_path, monkeypatch):
    from dsv3lab.train import lab_model as LM
    tok, _, _ = corpus
    docs = T.python_docs_corpus(docstrings=False)[:12]
    fake = dict(train=docs[:9], val=docs[9:], val_code=["def f(x):\n    return x + 1\n" * 40],
                n_topics=12, n_source_files=1)
    monkeypatch.setattr(LM, "lab_corpus", lambda source_code=False, seed=0: fake)
    monkeypatch.setattr(LM, "speculative_stats", lambda model, ids, n, p, k: dict(acceptance_rate=0.5, tokens_per_step=1.5))
    model = dsv3lab.build(CFG, seed=0)
    dsv3lab.save(model, str(tmp_path / "m"), extra_files={"tokenizer.json": tok.to_str(), "README.md": "# card\n"})
    a = LM.assess(str(tmp_path / "m"), seq_len=16)
    assert a["trained_on_code"] is False and a["mtp_acceptance"] == 0.5
    for key in ("val", "val_code"):
        h = a["heldout"][key]
        assert h["nats_per_char"] > 0 and h["unigram_nats_per_char"] > 0 and h["chars"] > 0
    ev = T.evaluate(dsv3lab.load(str(tmp_path / "m"), dtype=torch.float32),
                    T.eval_windows(T.encode_documents(tok, fake["val"]), 32, 18), 8)
    assert a["val_loss"] == pytest.approx(ev["val_loss"], rel=1e-5)
    assert isinstance(a["sample"], str) and a["bytes"] > 0
