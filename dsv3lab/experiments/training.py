"""What the training experiments share: the token streams and one seeded training run per arm.

Every training experiment reads the same text (Python's reference manual, plus the standard
library's docstrings at full scale), tokenized by a byte-level BPE of the preset's vocabulary
trained on the training documents, split by whole document with a fixed split seed. The
experiment seed then seeds the model's initialisation and the order of training windows, so two
arms of one seed see the same windows in the same order from the same initial weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

from dsv3lab.config import ModelConfig
from dsv3lab.train.corpus import (encode_documents, eval_windows, python_docs_corpus, split_documents,
                                  train_tokenizer)
from dsv3lab.train.evaluate import evaluate
from dsv3lab.train.loop import TrainConfig, train

SPLIT_SEED = 0      # the document split is part of the data, not of the experiment seed


@functools.lru_cache(maxsize=4)
def token_streams(vocab_size: int, docstrings: bool, max_docs: Optional[int] = None):
    """(tokenizer, train_ids, val_ids) for the corpus; cached per process, since every arm and
    seed of every experiment reads the same streams."""
    docs = python_docs_corpus(docstrings=docstrings)
    if max_docs is not None:
        docs = docs[:max_docs]
    train_docs, val_docs = split_documents(docs, 0.05, seed=SPLIT_SEED)
    tok = train_tokenizer(train_docs, vocab_size)
    return tok, encode_documents(tok, train_docs), encode_documents(tok, val_docs)


def model_config(cfg: dict) -> ModelConfig:
    """The experiment's model: ``cfg["preset"]`` with ``cfg.get("model", {})`` fields replaced."""
    mc = ModelConfig.preset(cfg["preset"])
    return dataclasses.replace(mc, **cfg.get("model", {})) if cfg.get("model") else mc


def train_config(cfg: dict, seed: int, **arm) -> TrainConfig:
    """TrainConfig from the experiment's ``cfg["train"]`` plus the arm's changes and the seed."""
    return TrainConfig(seed=seed, threads=cfg.get("threads", 1), eval_every=10 ** 9,
                       **{**cfg["train"], **arm})


def run_training(cfg: dict, seed: int, model_overrides: Optional[dict] = None,
                 on_step: Optional[Callable] = None, **arm) -> dict:
    """One arm of one seed: train, then evaluate on fixed validation windows. Returns
    {"model", "log", "val": evaluate(...), "tokenizer", "val_ids", "val_windows"}."""
    mc = model_config(cfg)
    if model_overrides:
        mc = dataclasses.replace(mc, **model_overrides)
    tok, train_ids, val_ids = token_streams(mc.vocab_size, cfg["docstrings"], cfg.get("max_docs"))
    tc = train_config(cfg, seed, **arm)
    model, log = train(mc, train_ids, None, tc, progress=False, on_step=on_step)
    val_w = eval_windows(val_ids, cfg["val_windows"], tc.seq_len + 2)
    return dict(model=model, log=log, val=evaluate(model, val_w, tc.batch_size), tokenizer=tok,
                val_ids=val_ids, val_windows=val_w)


def tail_mean(xs, frac: float = 0.2) -> float:
    """Mean of the last ``frac`` of a per-step series (at least one value)."""
    xs = [float(x) for x in xs if x is not None]
    n = max(1, int(round(len(xs) * frac)))
    return sum(xs[-n:]) / n
