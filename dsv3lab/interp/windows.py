"""Text for the instruments: windows of the lab corpus (Python's own reference manual) and the loss
on them. The manual's 79 topics load in well under a second (the standard-library docstrings of the
training corpus take ~10 s to walk and are left out here); the held-out split is the one the lab
model was validated on, so the windows are text it never trained on."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def corpus_documents(split: str = "val", docstrings: bool = False) -> list[str]:
    """Documents of the lab corpus: ``split`` 'val' (held out by ``split_documents``), 'train' or 'all'."""
    from dsv3lab.train import python_docs_corpus, split_documents
    docs = python_docs_corpus(docstrings=docstrings)
    if split == "all":
        return docs
    train, val = split_documents(docs)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    return val if split == "val" else train


def encode(codec, text: str) -> list[int]:
    """Token ids of ``text`` with a ``TextCodec`` (``dsv3lab.probes.text``) or a ``tokenizers`` tokenizer."""
    if hasattr(codec, "encode") and not hasattr(codec, "get_vocab"):
        return list(codec.encode(text))
    return list(codec.encode(text).ids)


def corpus_windows(codec, n: int = 8, length: int = 128, split: str = "val", eos_id: int = 1) -> torch.Tensor:
    """Up to ``n`` consecutive windows [n, length] of the corpus split as one token stream (EOS
    after each document)."""
    ids: list[int] = []
    for doc in corpus_documents(split):
        ids.extend(encode(codec, doc))
        ids.append(eos_id)
        if len(ids) >= n * length:
            break
    if len(ids) < length:
        raise ValueError(f"the {split} corpus gives {len(ids)} tokens, fewer than one window of {length}")
    m = min(n, len(ids) // length)
    return torch.tensor(ids[:m * length], dtype=torch.int64).view(m, length)


@torch.no_grad()
def next_token_loss(model, windows: torch.Tensor, batch_size: int = 8, per_token: bool = False):
    """Mean next-token cross-entropy (nats) of ``model`` over windows [N, S] (targets are each
    window's own next tokens); ``per_token=True`` returns the [N, S-1] losses instead."""
    out = []
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i:i + batch_size].to(model.device)
        logits = model(w[:, :-1])
        out.append(F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(),
                                   reduction="none").view(w.shape[0], -1))
    losses = torch.cat(out)
    return losses if per_token else float(losses.mean())
