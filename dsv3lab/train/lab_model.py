"""The lab's default model (``data/lab-model``): the recipe and its run.

A byte-level BPE tokenizer and the ``lab`` preset trained on text that ships with Python (the
reference manual and the standard library's docstrings), saved as FP8 in the official layout with
its tokenizer, training log, model card and loss curve.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from typing import Optional

import torch

from dsv3lab.atomic import write_bytes_atomic
from dsv3lab.config import ModelConfig
from dsv3lab.probes.gate import biases_zeroed, moe_gates
from dsv3lab.train.card import model_card
from dsv3lab.train.corpus import (encode_documents, eval_windows, python_docs_with_origin, split_documents,
                                  stdlib_sources, train_tokenizer)
from dsv3lab.train.evaluate import evaluate, speculative_stats, teacher_forced_agreement, unigram_cross_entropy
from dsv3lab.train.heldout import text_loss, unigram_text_loss
from dsv3lab.train.log import jsonl_text, plot_training_log
from dsv3lab.train.loop import TrainConfig, train
from dsv3lab.train.sample import greedy_continue


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# The lab run's departures from TrainConfig's defaults (see the model card): a smaller batch
# buys more updates in a 10-minute CPU budget, and a larger bias step lets the biases catch up
# with routing that collapses within the first few steps.
LAB_RUN = dict(batch_size=4, bias_gamma=0.01, threads=1, eval_batches=8)


def lab_corpus(source_code: bool = False, seed: int = 0) -> dict:
    """The lab model's documents. Validation is always the same 5 % of the manual's topics and
    the standard library's docstrings (split by whole document, ``seed``), so models trained with
    and without code are scored on the same held-out prose. With ``source_code`` the training
    set adds the standard library's source files, except every module a validation docstring
    came from (its source contains that docstring verbatim); those modules' sources are the
    held-out code. Returns {"train", "val", "val_code", "n_topics", "n_source_files"}."""
    pairs = python_docs_with_origin()
    docs = [t for _, t in pairs]
    train_docs, val_docs = split_documents(docs, 0.05, seed)
    out = dict(train=train_docs, val=val_docs, val_code=[], n_source_files=0,
               n_topics=sum(o.startswith("topic:") for o, _ in pairs))
    if source_code:
        val_set = set(val_docs)
        held = {o for o, t in pairs if t in val_set and not o.startswith("topic:")}
        code = stdlib_sources()
        out["train"] = train_docs + [src for rel, src in code if rel not in held]
        out["val_code"] = [src for rel, src in code if rel in held]
        out["n_source_files"] = sum(rel not in held for rel, _ in code)
    return out


HELDOUT_CODE_CHARS = 200_000    # the held-out code scored (the first modules, in order): CPU time


def heldout_numbers(model, tok, corpus: dict, train_ids: torch.Tensor, seq_len: int) -> dict:
    """Nats per character on the held-out prose (and code, if any: its first
    ``HELDOUT_CODE_CHARS`` characters of whole modules) for the model and for the unigram model
    of its training tokens: the numbers that compare lab models across tokenizers."""
    out = {}
    for key in ("val", "val_code"):
        docs = corpus[key]
        if key == "val_code":
            keep, n = [], 0
            for d in docs:
                if n >= HELDOUT_CODE_CHARS:
                    break
                keep.append(d)
                n += len(d)
            docs = keep
        if docs:
            m = text_loss(model, tok, docs, seq_len)
            u = unigram_text_loss(tok, train_ids, docs, seq_len)
            out[key] = dict(nats_per_char=m["nats_per_char"], unigram_nats_per_char=u["nats_per_char"],
                            nats_per_token=m["nats_per_token"], chars=m["chars"])
    return out


def train_lab(out: str = "data/lab-model", steps: Optional[int] = None, minutes: Optional[float] = None,
              seed: int = 0, preset: str = "lab", progress: bool = True, source_code: bool = False,
              init_from: Optional[str] = None, **overrides) -> dict:
    """Build the lab's default model into ``out``; returns the numbers of its model card.
    ``steps`` fixes the run (reproducible); ``minutes`` instead times three steps first and
    picks the step count that fits, with a hard stop at that wall time. ``source_code`` adds
    the standard library's source to the training text (``lab_corpus``). ``init_from`` continues
    training a saved lab model (its weights and its tokenizer) instead of starting from scratch;
    its validation split is the same, so its held-out text stays held out."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from dsv3lab.checkpoint import load, save
    from dsv3lab.model.build import build

    cfg = ModelConfig.preset(preset)
    tc = TrainConfig(seed=seed, **{**LAB_RUN, **overrides})
    torch.set_num_threads(tc.threads)
    t0 = time.perf_counter()
    corpus = lab_corpus(source_code, seed)
    train_docs, val_docs = corpus["train"], corpus["val"]
    docs = train_docs + val_docs
    start = None
    if init_from is not None:
        from tokenizers import Tokenizer
        start = load(init_from, dtype=torch.float32)
        cfg = start.cfg
        tok = Tokenizer.from_file(os.path.join(init_from, "tokenizer.json"))
    else:
        tok = train_tokenizer(train_docs, cfg.vocab_size)
    train_ids = encode_documents(tok, train_docs, cfg.eos_token_id)
    val_ids = encode_documents(tok, val_docs, cfg.eos_token_id)
    print(f"corpus: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars; "
          f"{train_ids.numel():,} train / {val_ids.numel():,} val tokens "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    if steps is None:
        minutes = 10.0 if minutes is None else minutes
        probe = dataclasses.replace(tc, steps=3, eval_every=10 ** 9)
        t = time.perf_counter()
        train(cfg, train_ids, None, probe, progress=False)
        per_step = (time.perf_counter() - t) / 3
        steps = max(10, int(minutes * 60 * 0.92 / (per_step * (1 + 0.4 / tc.eval_every * tc.eval_batches))))
        print(f"{per_step:.2f} s/step -> {steps} steps for {minutes:g} min", file=sys.stderr)
        tc = dataclasses.replace(tc, steps=steps, max_seconds=minutes * 60)
    else:
        tc = dataclasses.replace(tc, steps=steps)
    tc = dataclasses.replace(tc, warmup_steps=min(tc.warmup_steps, max(1, tc.steps // 10)))

    val_w = eval_windows(val_ids, tc.eval_batches * tc.batch_size, tc.seq_len + 2)
    init = evaluate(start if start is not None else build(cfg, seed=seed), val_w, tc.batch_size)
    model, log = train(cfg, train_ids, val_ids, tc, model=start, progress=progress)
    final = evaluate(model, val_w, tc.batch_size)
    with biases_zeroed(model):
        nobias = evaluate(model, val_w, tc.batch_size)

    heldout = heldout_numbers(model, tok, corpus, train_ids, tc.seq_len)
    spec = speculative_stats(model, val_ids, 16, 32, 64)
    agree = teacher_forced_agreement(model, val_w[:, :tc.seq_len + 1])
    prompt = "The list"
    sample = greedy_continue(model, tok, prompt, 48, cfg.eos_token_id)
    sample_t = greedy_continue(model, tok, prompt, 48, cfg.eos_token_id, temperature=0.8, seed=0)
    wall = log[-1]["elapsed_s"]
    n_tok = len(log) * tc.batch_size * tc.seq_len
    argv = ["python -m dsv3lab train-lab", f"--out {out}", f"--steps {tc.steps}"]
    for flag, key in (("--seed", "seed"), ("--threads", "threads"), ("--batch-size", "batch_size"),
                      ("--lr", "lr"), ("--gamma", "bias_gamma"), ("--seq-len", "seq_len")):
        if key == "seed" and not seed:
            continue
        if key != "seed" and getattr(tc, key) != LAB_RUN.get(key, getattr(TrainConfig, key)):
            argv.append(f"{flag} {getattr(tc, key)}")
    if source_code:
        argv.append("--source-code")
    if init_from is not None:
        argv.append(f"--init-from {init_from}")
    info = dict(
        preset=preset, params_m=sum(p.numel() for p in model.parameters()) / 1e6, layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, experts=cfg.n_routed_experts, expert_width=cfg.moe_intermediate_size,
        groups=cfg.n_group, top_k=cfg.num_experts_per_tok, python=sys.version.split()[0],
        n_topics=corpus["n_topics"], n_source_files=corpus["n_source_files"], n_docs=len(docs), chars=sum(map(len, docs)), seed=seed,
        train_tokens=train_ids.numel(), val_tokens=val_ids.numel(), vocab=cfg.vocab_size,
        chars_per_token=sum(map(len, train_docs)) / train_ids.numel(),
        steps=len(log), batch_size=tc.batch_size, seq_len=tc.seq_len, tokens_seen=n_tok,
        epochs=n_tok / train_ids.numel(), wall_s=wall, threads=tc.threads, tok_s=n_tok / wall,
        lr=tc.lr, warmup=tc.warmup_steps, min_lr_ratio=tc.min_lr_ratio, mtp_lambda=tc.mtp_lambda,
        gamma=tc.bias_gamma,
        train_loss=sum(r["loss"] for r in log[-20:]) / len(log[-20:]),
        val_loss=final["val_loss"], val_mtp_loss=final.get("val_mtp_loss", float("nan")),
        unigram=unigram_cross_entropy(train_ids, val_ids, cfg.vocab_size),
        maxvio_init=init["val_maxvio"], maxvio_final=final["val_maxvio"],
        maxvio_nobias=nobias["val_maxvio"], moe_layers=len(moe_gates(model)),
        prompt=prompt, sample=sample, sample_t=sample_t, command=" ".join(argv), val_loss_fp8=float("nan"),
        schedule_steps=tc.steps, heldout=heldout, mtp_acceptance=spec["acceptance_rate"],
        mtp_tokens_per_step=spec["tokens_per_step"], mtp_agreement=agree, init_from=init_from)

    save(model, out, fp8=True, extra_files={
        "tokenizer.json": tok.to_str(pretty=False),
        "training_log.jsonl": jsonl_text(log),
        "README.md": model_card(info)})
    reloaded = load(out, dtype=torch.float32)
    info["val_loss_fp8"] = evaluate(reloaded, val_w, tc.batch_size)["val_loss"]
    write_bytes_atomic(os.path.join(out, "README.md"), model_card(info).encode())
    fig = plot_training_log(log, f"lab model: {len(log)} steps, {wall / 60:.1f} min on CPU")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    write_bytes_atomic(os.path.join(out, "training_curve.png"), buf.getvalue())
    info["bytes"] = _dir_bytes(out)
    info["total_s"] = time.perf_counter() - t0
    return info


def assess(model_dir: str, seed: int = 0, seq_len: int = 256, prompt: str = "The list") -> dict:
    """The numbers that compare lab models, for a saved one (its own tokenizer): validation loss
    and MaxVio on its tokens, nats per character on the held-out prose and code of
    ``lab_corpus(source_code=True)`` (held out from every recipe) against the unigram model of
    the recipe's training text, MTP draft agreement and acceptance, and a greedy sample."""
    from tokenizers import Tokenizer
    from dsv3lab.checkpoint import load
    model = load(model_dir, dtype=torch.float32)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    cfg = model.cfg
    with open(os.path.join(model_dir, "README.md")) as f:
        with_code = "source of" in f.read()          # the card says which recipe trained it
    corpus = lab_corpus(source_code=True, seed=seed)
    train_docs = corpus["train"] if with_code else lab_corpus(False, seed)["train"]
    train_ids = encode_documents(tok, train_docs, cfg.eos_token_id)
    val_ids = encode_documents(tok, corpus["val"], cfg.eos_token_id)
    val_w = eval_windows(val_ids, 32, seq_len + 2)
    ev = evaluate(model, val_w, 8)
    spec = speculative_stats(model, val_ids, 16, 32, 64) if len(model.mtp) else {}
    return dict(model=model_dir, trained_on_code=with_code, val_loss=ev["val_loss"], val_acc=ev["val_acc"],
                maxvio_batch=ev.get("val_maxvio"), maxvio_global=ev.get("val_maxvio_global"),
                unigram=unigram_cross_entropy(train_ids, val_ids, cfg.vocab_size),
                heldout=heldout_numbers(model, tok, corpus, train_ids, seq_len),
                mtp_agreement=teacher_forced_agreement(model, val_w[:, :seq_len + 1]) if len(model.mtp) else None,
                mtp_acceptance=spec.get("acceptance_rate"), mtp_tokens_per_step=spec.get("tokens_per_step"),
                sample=greedy_continue(model, tok, prompt, 48, cfg.eos_token_id),
                bytes=_dir_bytes(model_dir))

