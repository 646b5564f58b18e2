"""Give a trained V3 model a lightning indexer and fit it with the V3.2 report's dense warm-up.

V3.2 was made from V3.1 by adding an indexer to every layer and training it first alone (V3.2
report, sec. 2.1.1, "dense warm-up"): the main model frozen, attention still dense, and for each
query s the indexer's softmax over the visible keys pulled toward MLA's attention summed over
heads and renormalised,
    p_s = sum_h p_h[s, :] / H,      loss = sum_layers mean_s KL(p_s || softmax(I[s, :]))
(the report trains 1000 steps of 16 x 128K tokens at lr 1e-3 this way, then moves to sparse
training). Here the same loss at lab scale: the lab model, short windows of its own corpus, a few
hundred CPU steps. ``with_indexer`` adds a randomly initialised indexer; ``collect`` runs the
frozen model once per batch for the indexer's inputs and targets; ``warmup`` fits on them;
``save_indexer``/``lab_dsa_model`` keep only the indexer's weights beside the lab model
(``data/lab-model-dsa/``), so the V3 weights are stored once.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

import torch

INDEXER_FILE = "indexer.safetensors"


def with_indexer(model, index_n_heads: int = 4, index_head_dim: int = 64, index_topk: int = 64,
                 seed: int = 0):
    """A V3.2 copy of ``model``: the same weights plus a random lightning indexer in every layer."""
    from dsv3lab.model.build import build
    cfg = model.cfg.replace(index_n_heads=index_n_heads, index_head_dim=index_head_dim,
                            index_topk=index_topk, name=f"{model.cfg.name}-dsa")
    new = build(cfg, seed=seed, dtype=model.dtype, device=model.device)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".indexer." not in k for k in missing):
        raise RuntimeError(f"with_indexer: weights do not carry over (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    return new.eval()


def kl_to_dense(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """mean over queries of KL(sum_h probs / H || softmax(scores)); scores [B,S,T] with -inf on
    invisible keys, probs [B,H,S,T] (rows sum to 1)."""
    target = probs.float().mean(1)                                           # [B,S,T]
    visible = torch.isfinite(scores)
    logq = torch.log_softmax(scores.float(), dim=-1).masked_fill(~visible, 0.0)
    logp = torch.log(target.clamp_min(1e-30)).masked_fill(target <= 0, 0.0)
    return (target * (logp - logq)).sum(-1).mean()


def collect(model, batches: Iterable[torch.Tensor], n_batches: int, progress: bool = True) -> list[dict]:
    """Run the frozen model (dense attention) on ``n_batches`` batches and keep, per batch and
    layer, what the indexer reads (x, the q latent, cos/sin) and the target sum_h p_h / H.
    During the dense warm-up neither depends on the indexer, so they are computed once."""
    from tqdm.auto import tqdm

    from dsv3lab.probes.selection import indexers
    named = indexers(model)
    if not named:
        raise ValueError("warmup: the model has no indexer (use with_indexer first)")
    saved_k = [ix.index_topk for _, ix in named]
    got: dict = {}
    hooks = []
    for L, ix in named:
        ix.index_topk = model.cfg.max_position_embeddings        # dense attention while warming up
        hooks.append(ix.register_forward_pre_hook(
            lambda m, a, L=L: got.__setitem__((L, "in"), tuple(t.detach() for t in a[:4]))))
        hooks.append(ix.hook_dense_probs.register_forward_hook(
            lambda m, i, o, L=L: got.__setitem__((L, "p"), o.detach().float().mean(1))))
    model.set_attn_mode("sparse")
    data = []
    try:
        it = iter(batches)
        with torch.no_grad():
            for _ in tqdm(range(n_batches), desc="warm-up targets", disable=not progress):
                got.clear()
                model(next(it))
                data.append({L: (got[(L, "in")], got[(L, "p")]) for L, _ in named})
    finally:
        for h in hooks:
            h.remove()
        for (_, ix), k in zip(named, saved_k):
            ix.index_topk = k
    return data


def warmup(model, data: list[dict], steps: int, lr: float = 1e-3, seed: int = 0,
           progress: bool = True) -> list[float]:
    """Fit every indexer of ``model`` with the KL warm-up on batches from ``collect``, one random
    batch per step (the rest of the model is not run: it is frozen); returns the loss per step."""
    from tqdm.auto import tqdm

    from dsv3lab.model.indexer import index_scores
    from dsv3lab.probes.selection import indexers
    named = dict(indexers(model))
    params = [p for ix in named.values() for p in ix.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    try:
        for _ in tqdm(range(steps), desc="indexer warm-up", disable=not progress):
            batch = data[int(torch.randint(len(data), (1,), generator=gen))]
            loss = 0.0
            for L, ((x, ql, cos, sin), target) in batch.items():
                q, k, w = named[L].project(x, ql, cos, sin)
                loss = loss + kl_to_dense(index_scores(q, w, k, 0), target[:, None])
            loss = loss / len(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        for p in params:
            p.requires_grad_(False)
    return losses


def save_indexer(model, path: str, meta: Optional[dict] = None) -> str:
    """Write only the indexer weights (``INDEXER_FILE``) and their config fields (``indexer.json``)."""
    from safetensors.torch import save_file

    from dsv3lab.atomic import atomic_write, write_json_atomic
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if ".indexer." in k}
    atomic_write(os.path.join(path, INDEXER_FILE), lambda tmp: save_file(state, tmp))
    cfg = model.cfg
    write_json_atomic(os.path.join(path, "indexer.json"),
                      dict(index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
                           index_topk=cfg.index_topk, **(meta or {})))
    return path


def lab_dsa_model(base: str = "data/lab-model", indexer: str = "data/lab-model-dsa", dtype=None):
    """The lab model with the warmed-up indexer in every layer (a V3.2 model, sparse attention)."""
    from safetensors.torch import load_file

    from dsv3lab.checkpoint import load
    with open(os.path.join(indexer, "indexer.json")) as f:
        fields = json.load(f)
    model = with_indexer(load(base, dtype=dtype), fields["index_n_heads"], fields["index_head_dim"],
                         fields["index_topk"])
    state = load_file(os.path.join(indexer, INDEXER_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".indexer." in k for k in missing):
        raise RuntimeError(f"{indexer}: indexer weights do not match the model "
                           f"(missing {[k for k in missing if '.indexer.' in k][:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def corpus_batches(tokenizer_dir: str = "data/lab-model", batch: int = 4, length: int = 256,
                   seed: int = 0, split: str = "train"):
    """Endless random windows [batch, length] of the lab corpus (train or val documents)."""
    from dsv3lab.tokenizer import load_tokenizer
    from dsv3lab.train.corpus import encode_documents, python_docs_corpus, sample_windows, split_documents
    train, val = split_documents(python_docs_corpus())
    stream = encode_documents(load_tokenizer(tokenizer_dir), train if split == "train" else val)
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield sample_windows(stream, batch, length, gen)


def main(argv=None) -> int:
    """python -m dsv3lab.train.indexer_warmup [--steps N]: fit and write data/lab-model-dsa/."""
    import argparse
    import time

    from dsv3lab.checkpoint import load
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--base", default="data/lab-model")
    p.add_argument("--out", default="data/lab-model-dsa")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=24, help="distinct batches the targets are computed for")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (small ops: 1 is fastest)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = with_indexer(load(a.base, dtype=torch.float32), a.heads, a.dim, a.topk, a.seed)
    t0 = time.perf_counter()
    data = collect(model, corpus_batches(a.base, a.batch, a.length, a.seed), a.batches)
    losses = warmup(model, data, a.steps, a.lr, a.seed)
    meta = dict(recipe="dense warm-up (KL to MLA's head-summed attention), V3.2 report sec. 2.1.1",
                steps=a.steps, batches=a.batches, batch=a.batch, length=a.length, lr=a.lr, seed=a.seed,
                seconds=round(time.perf_counter() - t0, 1), loss_first=losses[0], loss_last=losses[-1],
                losses=[round(x, 5) for x in losses])
    save_indexer(model, a.out, meta)
    print(f"wrote {a.out}: KL {losses[0]:.3f} -> {losses[-1]:.3f} in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
