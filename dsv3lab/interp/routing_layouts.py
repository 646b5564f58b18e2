"""Per-token routing as inference engines return it for RL routing replay, to and from trace records.

vLLM (``--enable-return-routed-experts``) answers each request with ``prompt_routed_experts``
[prompt_len, num_moe_layers, top_k] and ``routed_experts`` [gen_len, num_moe_layers, top_k], int16
expert ids. SGLang (``return_routed_experts``) returns ``routed_experts`` as a base64 string of
int32 ids, flattened from [num_tokens, num_layers, top_k], covering positions [0, seqlen - 1) (the
last sampled token has not been through the model yet). Both are one request's tokens in position
order, with ids and no weights: a record built from them has NaN ``topk_weights``, so replaying it
needs ``recompute_weights=True`` (the weights are then the current gate's scores of the recorded
experts, as RL replay does).

  from_per_token(ids [N, layers, k], model)  -> record  (layer axis: MoE layers, or every block)
  from_vllm(prompt_routed_experts, routed_experts, model) / to_vllm(record) -> dict of int16 arrays
  from_sglang_routed(b64, model) / to_sglang_routed(record) -> base64 str
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from dsv3lab.probes import Routing


def _moe_layers(model) -> list[int]:
    return [blk.layer for blk in model.layers if hasattr(blk.mlp, "gate")]


def from_per_token(ids, model, token_ids=None, source: str = "per-token") -> dict:
    """A dsv3lab record (main stream, one step) from per-token ids [N, layers, top_k] of one
    sequence in position order. The layer axis is either the model's MoE layers or all its blocks
    (dense blocks' rows are then dropped)."""
    t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, torch.Tensor) else ids).to(torch.int64)
    cfg = model.cfg
    moe = _moe_layers(model)
    if t.dim() != 3:
        raise ValueError(f"{source}: routed experts must be [tokens, layers, top_k], got shape {tuple(t.shape)}")
    N, L, k = t.shape
    if L == cfg.num_hidden_layers and L != len(moe):
        t = t[:, moe]
    elif L != len(moe):
        raise ValueError(f"{source}: layer axis has {L} entries; the model has {len(moe)} MoE layers "
                         f"({cfg.num_hidden_layers} blocks)")
    if k != cfg.num_experts_per_tok:
        raise ValueError(f"{source}: top_k axis has {k} entries, the model routes to {cfg.num_experts_per_tok}")
    if N and (int(t.min()) < 0 or int(t.max()) >= cfg.n_routed_experts):
        raise ValueError(f"{source}: expert ids must lie in [0, {cfg.n_routed_experts}), got "
                         f"[{int(t.min())}, {int(t.max())}]")
    tok = (torch.as_tensor(token_ids).to(torch.int64).reshape(-1) if token_ids is not None
           else torch.full((N,), -1, dtype=torch.int64))
    if tok.numel() != N:
        raise ValueError(f"{source}: {tok.numel()} token ids for {N} rows of routing")
    tensors = dict(topk_ids=t.permute(1, 0, 2).contiguous(),
                   topk_weights=torch.full((len(moe), N, k), float("nan")),
                   token_ids=tok, positions=torch.arange(N), seq=torch.zeros(N, dtype=torch.int64),
                   step=torch.zeros(N, dtype=torch.int64))
    meta = dict(format="dsv3lab-trace", version=1, model=cfg.name, n_routed_experts=cfg.n_routed_experts,
                top_k=k, n_group=cfg.n_group, topk_group=cfg.topk_group,
                num_hidden_layers=cfg.num_hidden_layers, layers=moe,
                steps=[dict(step=0, start=0, batch=1, seq_len=N, kept=N)], dropped_tokens=0,
                mtp_depths=[], mtp={}, rank=0, world_size=1, source=source)
    return dict(tensors=tensors, meta=meta)


def from_vllm(prompt_routed_experts, routed_experts, model, token_ids=None) -> dict:
    """vLLM's two arrays (prompt rows, then generated rows) -> one record in position order."""
    parts = [np.asarray(a) for a in (prompt_routed_experts, routed_experts) if a is not None]
    if not parts:
        raise ValueError("vLLM routing: neither prompt_routed_experts nor routed_experts given")
    return from_per_token(np.concatenate(parts, axis=0), model, token_ids, source="vLLM routed_experts")


def _one_sequence_ids(record: dict) -> np.ndarray:
    r = Routing(record)
    if r.seq is not None and r.n_tokens and int(r.seq.max()) > 0:
        raise ValueError("per-token layouts hold one sequence; the record has several batch rows "
                         "(slice it per sequence first)")
    order = torch.argsort(r.positions, stable=True) if r.positions is not None else torch.arange(r.n_tokens)
    return r.topk_ids[:, order].permute(1, 0, 2).contiguous().numpy()        # [N, L, k]


def to_vllm(record: dict, prompt_len: int) -> dict:
    """A one-sequence record -> vLLM's ``prompt_routed_experts`` / ``routed_experts`` (int16)."""
    ids = _one_sequence_ids(record).astype(np.int16)
    return dict(prompt_routed_experts=ids[:prompt_len], routed_experts=ids[prompt_len:])


def to_sglang_routed(record: dict) -> str:
    """A one-sequence record -> SGLang's base64 int32 ``routed_experts`` (MoE layers on the layer axis)."""
    return base64.b64encode(_one_sequence_ids(record).astype(np.int32).tobytes()).decode("ascii")


def from_sglang_routed(b64: str, model, num_layers: int | None = None, token_ids=None) -> dict:
    """SGLang's base64 int32 ids -> record. ``num_layers`` is the dump's layer axis (default: the
    model's MoE layer count; pass ``model.cfg.num_hidden_layers`` for a dump over every block)."""
    flat = np.frombuffer(base64.b64decode(b64), dtype=np.int32)
    L = num_layers or len(_moe_layers(model))
    k = model.cfg.num_experts_per_tok
    if flat.size % (L * k):
        raise ValueError(f"SGLang routed_experts: {flat.size} ids do not split into [tokens, {L}, {k}]")
    return from_per_token(flat.reshape(-1, L, k).copy(), model, token_ids, source="SGLang routed_experts")
