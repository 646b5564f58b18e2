"""Held-out text scored per character, so models with different tokenizers compare fairly.

A loss in nats per token depends on the tokenizer (a larger vocabulary packs more characters into
a token); nats per character does not. ``text_loss`` runs a model over documents it never saw
(each followed by EOS, cut into non-overlapping windows) and sums the next-token cross-entropy;
``unigram_text_loss`` is the context-free baseline with the same tokenizer, fitted on the
model's training tokens (add-one smoothed), on the same text.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from dsv3lab.train.corpus import BOS, EOS, encode_documents


@torch.no_grad()
def text_loss(model, tok, docs: Sequence[str], seq_len: int = 256, batch_size: int = 8,
              eos_id: int = 1) -> dict:
    """{"nats_per_token", "nats_per_char", "tokens", "chars"} of ``model`` on ``docs``: windows of
    ``seq_len + 1`` tokens, each predicting its last ``seq_len`` from what precedes it in the window.
    The leftover tail shorter than a window is dropped (and not counted in ``chars``)."""
    ids = encode_documents(tok, docs, eos_id)
    n = ids.numel() // (seq_len + 1)
    if n == 0:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than one window of {seq_len + 1}")
    windows = ids[:n * (seq_len + 1)].view(n, seq_len + 1)
    total = 0.0
    model.eval()
    for w in windows.split(batch_size):
        logits = model(w[:, :-1].to(model.device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten().to(logits.device),
                                       reduction="sum"))
    tokens = n * seq_len
    chars = _chars_of(tok, windows)
    return dict(nats_per_token=total / tokens, nats_per_char=total / chars, tokens=tokens, chars=chars)


def unigram_text_loss(tok, train_ids: torch.Tensor, docs: Sequence[str], seq_len: int = 256,
                      eos_id: int = 1) -> dict:
    """The same numbers for the add-one smoothed unigram model of ``train_ids`` (same windows)."""
    ids = encode_documents(tok, docs, eos_id)
    n = ids.numel() // (seq_len + 1)
    windows = ids[:n * (seq_len + 1)].view(n, seq_len + 1)
    counts = torch.bincount(train_ids, minlength=tok.get_vocab_size()).double() + 1.0
    logp = (counts / counts.sum()).log()
    total = float(-logp[windows[:, 1:]].sum())
    tokens = n * seq_len
    chars = _chars_of(tok, windows)
    return dict(nats_per_token=total / tokens, nats_per_char=total / chars, tokens=tokens, chars=chars)


def _chars_of(tok, windows: torch.Tensor) -> int:
    """Characters of the predicted tokens (each window's last seq_len), decoded per window; a
    special token (EOS) counts as one character, the document break it stands for."""
    chars = 0
    specials = {tok.token_to_id(t) for t in (BOS, EOS)} - {None}
    for w in windows[:, 1:].tolist():
        chars += len(tok.decode([t for t in w if t not in specials])) + sum(t in specials for t in w)
    return chars
