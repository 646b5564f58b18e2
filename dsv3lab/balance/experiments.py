"""The measurements behind notebooks/02_load_balancing, small enough to run on a laptop CPU.

  trace_load        [L, E] expert load of a model on a batch of token windows (dsv3lab.trace)
  biases_zeroed     ``with`` block that zeroes every gate's e_score_correction_bias (restored
                    after; defined in ``dsv3lab.probes.gate``)
  docs_windows      [B, S] token windows of Python's reference manual (pydoc_data.topics)
  balancing_ablation  seeded toy training runs, one per balancing scheme, -> per-step logs
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from dsv3lab.probes.gate import biases_zeroed  # noqa: F401  (re-exported by dsv3lab.balance)

# The three schemes the paper compares (FACTS C.5-C.7). The bias step and the aux weight are
# toy-scale values: the paper's gamma = 0.001 and alpha = 1e-4 are sized for ~1e5 steps of
# large batches and do nothing visible in a hundred steps.
SCHEMES: dict[str, dict] = {
    "aux-loss-free (bias, gamma 0.01)": dict(bias_gamma=0.01, aux_alpha=0.0),
    "sequence-wise aux loss (alpha 0.03)": dict(bias_gamma=0.0, aux_alpha=0.03),
    "no balancing": dict(bias_gamma=0.0, aux_alpha=0.0),
}


@torch.no_grad()
def trace_load(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """[moe_layers, E] tokens routed to each expert in one forward pass of ``tokens_BS``."""
    import dsv3lab
    with dsv3lab.trace(model) as t:
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


def balancing_ablation(tokens: torch.Tensor, preset: str = "tiny", steps: int = 120,
                       batch_size: int = 4, seq_len: int = 64, seed: int = 0,
                       schemes: Mapping[str, dict] = SCHEMES, **train_kw) -> dict[str, list[dict]]:
    """Train ``preset`` from the same seed and data once per scheme; returns {scheme: log}, each
    log one dict per step (``maxvio``, ``loss``, ...; see ``dsv3lab.train.train``)."""
    from dsv3lab.train import TrainConfig, train
    out = {}
    for label, kw in schemes.items():
        tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, seed=seed,
                         **{"warmup_steps": max(1, steps // 12), "eval_every": 10 ** 9,
                            "threads": 1, **train_kw, **kw})
        _, log = train(preset, tokens, None, tc, progress=False)
        out[label] = log
    return out
