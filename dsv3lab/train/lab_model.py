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
from dsv3lab.train.corpus import encode_documents, eval_windows, python_docs_corpus, split_documents, train_tokenizer
from dsv3lab.train.evaluate import evaluate, unigram_cross_entropy
from dsv3lab.train.log import jsonl_text, plot_training_log
from dsv3lab.train.loop import TrainConfig, train
from dsv3lab.train.sample import greedy_continue


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# The lab run's departures from TrainConfig's defaults (see the model card): a smaller batch
# buys more updates in a 10-minute CPU budget, and a larger bias step lets the biases catch up
# with routing that collapses within the first few steps.
LAB_RUN = dict(batch_size=4, bias_gamma=0.01, threads=1, eval_batches=8)


def train_lab(out: str = "data/lab-model", steps: Optional[int] = None, minutes: Optional[float] = None,
              seed: int = 0, preset: str = "lab", progress: bool = True, **overrides) -> dict:
    """Build the lab's default model into ``out``; returns the numbers of its model card.
    ``steps`` fixes the run (reproducible); ``minutes`` instead times three steps first and
    picks the step count that fits, with a hard stop at that wall time."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from dsv3lab.checkpoint import build, load, save

    cfg = ModelConfig.preset(preset)
    tc = TrainConfig(seed=seed, **{**LAB_RUN, **overrides})
    torch.set_num_threads(tc.threads)
    t0 = time.perf_counter()
    docs = python_docs_corpus()
    from pydoc_data.topics import topics
    train_docs, val_docs = split_documents(docs, 0.05, seed)
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
    init = evaluate(build(cfg, seed=seed), val_w, tc.batch_size)
    model, log = train(cfg, train_ids, val_ids, tc, progress=progress)
    final = evaluate(model, val_w, tc.batch_size)
    with biases_zeroed(model):
        nobias = evaluate(model, val_w, tc.batch_size)

    prompt = "The list"
    sample = greedy_continue(model, tok, prompt, 48, cfg.eos_token_id)
    sample_t = greedy_continue(model, tok, prompt, 48, cfg.eos_token_id, temperature=0.8, seed=0)
    wall = log[-1]["elapsed_s"]
    n_tok = len(log) * tc.batch_size * tc.seq_len
    argv = ["python -m dsv3lab train-lab", f"--out {out}", f"--steps {tc.steps}"]
    for flag, key in (("--seed", "seed"), ("--threads", "threads"), ("--batch-size", "batch_size"),
                      ("--lr", "lr"), ("--gamma", "bias_gamma")):
        if key == "seed" and not seed:
            continue
        if key != "seed" and getattr(tc, key) != LAB_RUN.get(key, getattr(TrainConfig, key)):
            argv.append(f"{flag} {getattr(tc, key)}")
    info = dict(
        params_m=sum(p.numel() for p in model.parameters()) / 1e6, layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size, experts=cfg.n_routed_experts, expert_width=cfg.moe_intermediate_size,
        groups=cfg.n_group, top_k=cfg.num_experts_per_tok, python=sys.version.split()[0],
        n_topics=len(topics), n_docs=len(docs), chars=sum(map(len, docs)), seed=seed,
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
        schedule_steps=tc.steps)

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
