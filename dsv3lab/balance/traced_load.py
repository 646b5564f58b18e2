"""Expert load traced from a model on windows of real text: the measurements behind
notebooks/02_load_balancing, small enough to run on a laptop CPU.

  trace_load        [L, E] expert load of a model on a batch of token windows (``dsv3lab.probes.trace``)
  docs_windows      [B, S] token windows of Python's reference manual (pydoc_data.topics)

With the gates' bias switched off for a comparison: ``dsv3lab.probes.gate.biases_zeroed``
(re-exported by ``dsv3lab.balance``).

The balancing ablation (bias vs sequence-wise vs batch-wise aux loss vs none, seeded training
runs with MaxVio and validation loss) is an experiment: ``dsv3lab.experiments.balancing``.
"""

from __future__ import annotations

from typing import Optional

import torch

from dsv3lab.probes.trace import trace


@torch.no_grad()
def trace_load(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """[moe_layers, E] tokens routed to each expert in one forward pass of ``tokens_BS``."""
    with trace(model) as t:
        model(tokens_BS)
    return t.routing.expert_load()


def docs_text(n_topics: Optional[int] = None, start: int = 0) -> str:
    """Topics of Python's reference manual (``pydoc_data.topics``, ships with Python), in
    sorted-key order."""
    import pydoc_data.topics as topics
    keys = sorted(topics.topics)
    keys = keys[start:start + n_topics] if n_topics else keys[start:]
    return "\n\n".join(topics.topics[k] for k in keys)


def docs_windows(encode, batch: int, seq_len: int, start_topic: int = 0) -> torch.Tensor:
    """[batch, seq_len] consecutive windows of the reference manual, tokenised by ``encode``
    (str -> list of ids)."""
    need = batch * seq_len
    ids: list[int] = []
    n = 8
    while len(ids) < need:
        ids = list(encode(docs_text(n, start_topic)))
        if n > 200:
            break
        n *= 2
    if len(ids) < need:
        raise ValueError(f"only {len(ids)} tokens of text for {batch} x {seq_len}")
    return torch.tensor(ids[:need], dtype=torch.int64).view(batch, seq_len)
