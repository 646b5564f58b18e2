"""Routing traces: which experts every token chose, in every MoE layer, over forward passes.

    with dsv3lab.trace(model) as t:
        model(tokens)                         # or model.generate(...), any number of calls
    t.routing.topk_ids        # [moe_layers, tokens, top_k]   int64, tokens batch-major per pass
    t.routing.topk_weights    # [moe_layers, tokens, top_k]   fp32 (what multiplies each expert)
    t.routing.expert_load()   # [moe_layers, n_routed_experts] (EPLB's ``weight`` shape)
    t.routing.token_ids / positions / seq / step               # [tokens] each
    t.mtp[0]                  # the same for MTP depth 0 (its own tokens), when it ran
    t.selection.topk_indices  # V3.2: [layers, queries, index_topk] keys the indexer kept (selection.py)
    t.save("trace.safetensors")

How it records, without touching the model: a forward pre-hook on ``embed_tokens`` sees the
token ids of each pass, pre-hooks on the blocks see ``start`` and [B,S], and hooks on each gate's
``hook_topk_ids``/``hook_topk_weights`` (plus ``hook_scores`` and ``hook_group_mask`` on request)
see the routing. One *step* is one call of the model (a prefill chunk or one decode step of
``generate``); it is kept only when every traced layer reported, so an exception mid-forward
leaves no ragged rows. MTP depth K is recorded as its own stream (``mtp.K.*`` hook points): its
token ids are the ones its embedding consumed (t_{i+1+K}) and its positions those of the main
hidden states it read; its ``step`` is the main pass it followed.

Memory stays bounded: ``max_tokens`` keeps the first N tokens of each stream (later ones are
counted in ``meta["dropped_tokens"]``); ``stream_to=DIR`` flushes committed steps to
``DIR/chunk-NNNNN.safetensors`` every ``flush_tokens`` tokens and writes ``DIR/trace.json`` at
exit (``dsv3lab.probes.load_trace(DIR)`` reads it back).

The record is a plain dict -- ``{"tensors": {name: Tensor}, "meta": {...}}`` -- with the main
stream's tensors under bare names (``topk_ids``, ``topk_weights``, ``token_ids``, ``positions``,
``seq``, ``step``, optionally ``scores`` [L,N,E], ``group_mask`` [L,N,G]) and MTP depth K's under
``mtp.K.<name>``. ``merge(records)`` concatenates records along tokens (data-parallel ranks, or
successive traces; a ``rank`` tensor is added) and ``gather(record)`` collects every rank's record
on rank 0 through ``torch.distributed`` -- the multi-rank engine needs nothing else from probes.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from dsv3lab.probes.metrics import expert_load, sequence_ids
from dsv3lab.probes.formats import load_trace, save_tensors, save_trace, write_json_atomic
from dsv3lab.probes.schema import (FORMAT, LAYER_KEYS, TOKEN_KEYS, VERSION, cat_dim, empty_stream_tensors,
                                   stream_prefixes)


# ----------------------------------------------------------------------------------------------
# the record (its names and empty tensors: schema.py)
# ----------------------------------------------------------------------------------------------

class Routing:
    """View of one stream of a record (main, or one MTP depth)."""

    def __init__(self, record: dict, prefix: str = ""):
        self.record, self.prefix = record, prefix
        self.meta = record["meta"] if not prefix else record["meta"]["mtp"][prefix.split(".")[1]]

    def _get(self, key):
        return self.record["tensors"].get(self.prefix + key)

    topk_ids = property(lambda self: self._get("topk_ids"))          # [L,N,k] int64
    topk_weights = property(lambda self: self._get("topk_weights"))  # [L,N,k] fp32
    scores = property(lambda self: self._get("scores"))              # [L,N,E] fp32 or None
    group_mask = property(lambda self: self._get("group_mask"))      # [L,N,G] bool or None
    token_ids = property(lambda self: self._get("token_ids"))        # [N] (-1 where unseen)
    positions = property(lambda self: self._get("positions"))        # [N]
    seq = property(lambda self: self._get("seq"))                    # [N] batch row in its step
    step = property(lambda self: self._get("step"))                  # [N] forward pass id
    layers = property(lambda self: list(self.meta["layers"]))        # model block indices
    n_routed_experts = property(lambda self: int(self.record["meta"]["n_routed_experts"]))
    top_k = property(lambda self: int(self.record["meta"]["top_k"]))
    n_tokens = property(lambda self: int(self.topk_ids.shape[1]))

    def expert_load(self) -> torch.Tensor:
        """[moe_layers, n_routed_experts] int64: tokens routed to each expert."""
        return expert_load(self.topk_ids, self.n_routed_experts)

    def sequences(self) -> torch.Tensor:
        """[N] int64 sequence id: one per (step, batch row) whose step starts at position 0
        continues with later steps of the same row (prefill then decode of one request)."""
        return sequence_ids(self)

    def __repr__(self) -> str:
        return (f"Routing(layers={self.layers}, tokens={self.n_tokens}, top_k={self.top_k}, "
                f"experts={self.n_routed_experts})")


def empty_meta(model: nn.Module) -> dict:
    cfg = model.cfg
    return dict(format=FORMAT, version=VERSION, model=cfg.name,
                n_routed_experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok,
                n_group=cfg.n_group, topk_group=cfg.topk_group, num_hidden_layers=cfg.num_hidden_layers,
                layers=[], steps=[], dropped_tokens=0, mtp_depths=[], mtp={}, rank=0, world_size=1)


def merge(records: list[dict]) -> dict:
    """Concatenate records along tokens: rank r's tokens follow rank r-1's; ``step`` ids are kept
    (the same pass on every rank) and a ``rank`` tensor [N] says where each token came from.
    Every record must trace the same layers of the same expert count."""
    if not records:
        raise ValueError("merge: no records")
    base = records[0]["meta"]
    for r in records[1:]:
        for key in ("n_routed_experts", "top_k", "layers", "mtp_depths"):
            if r["meta"][key] != base[key]:
                raise ValueError(f"merge: records disagree on {key}: {base[key]} vs {r['meta'][key]}")
    def _keys(r):
        return {k for k in r["tensors"] if not k.endswith("rank")}
    for r in records[1:]:
        if _keys(r) != _keys(records[0]):
            raise ValueError("merge: records hold different tensors (scores/groups traced in some only)")
    out_t: dict[str, torch.Tensor] = {}
    for prefix in stream_prefixes(records[0]):
        ranks = []
        for i, r in enumerate(records):
            n = r["tensors"][prefix + "token_ids"].shape[0]
            given = r["tensors"].get(prefix + "rank")
            ranks.append(given if given is not None else
                         torch.full((n,), int(r["meta"].get("rank", i)), dtype=torch.int64))
        out_t[prefix + "rank"] = torch.cat(ranks)
        for key in TOKEN_KEYS + LAYER_KEYS:
            if key == "rank" or prefix + key not in records[0]["tensors"]:
                continue
            dim = cat_dim(key)
            out_t[prefix + key] = torch.cat([r["tensors"][prefix + key] for r in records], dim=dim)
    meta = json.loads(json.dumps(base))
    meta["steps"] = [s for r in records for s in r["meta"]["steps"]]
    meta["dropped_tokens"] = sum(r["meta"]["dropped_tokens"] for r in records)
    meta["world_size"] = max(len(records), int(base.get("world_size", 1)))
    meta["rank"] = 0
    for d in base["mtp_depths"]:
        meta["mtp"][str(d)]["dropped_tokens"] = sum(r["meta"]["mtp"][str(d)]["dropped_tokens"]
                                                    for r in records)
    return dict(tensors=out_t, meta=meta)


def gather(record: dict, dst: int = 0, group=None, contribute: bool = True) -> Optional[dict]:
    """Collect every rank's record on global rank ``dst`` and merge them there (None elsewhere).
    Without an initialised process group this is ``record`` itself.

    Every rank of a tensor-parallel group runs the replicated gate on the same tokens, so their
    records are identical: pass ``contribute=(tp_rank == 0)`` to keep one copy per data-parallel
    group (the other ranks still take part in the collective)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return record
    rank, world = dist.get_rank(), dist.get_world_size(group)
    cpu = None
    if contribute:
        cpu = dict(tensors={k: v.cpu() for k, v in record["tensors"].items()},
                   meta=dict(record["meta"], rank=rank, world_size=world))
    bucket = [None] * world if rank == dst else None
    dist.gather_object(cpu, bucket, dst=dst, group=group)
    if rank != dst:
        return None
    got = [b for b in bucket if b is not None]
    return merge(got) if got else None


# ----------------------------------------------------------------------------------------------
# the recorder
# ----------------------------------------------------------------------------------------------

class _Stream:
    """Steps of one stream (main or one MTP depth) being collected."""

    def __init__(self, layers: list[int], meta: dict, max_tokens: Optional[int]):
        self.layers = layers
        self.meta = meta                 # the stream's meta dict (steps, dropped_tokens)
        self.max_tokens = max_tokens
        self.kept = 0                    # tokens committed so far
        self.current: Optional[dict] = None
        self.buffer: list[dict] = []     # committed steps not yet flushed
        self.buffered = 0

    def begin(self, ctx: dict, step_id: int):
        if self.current is not None:     # the previous step never completed: drop it
            self.meta["incomplete_steps"] = self.meta.get("incomplete_steps", 0) + 1
        self.current = dict(ctx=ctx, step=step_id, layers={})

    def add(self, layer: int, entry: dict) -> bool:
        """Record one layer of the current step; True once the step is complete."""
        if self.current is None:
            return False
        self.current["layers"][layer] = entry
        return len(self.current["layers"]) == len(self.layers)

    def commit(self):
        cur, self.current = self.current, None
        B, S, start = cur["ctx"]["B"], cur["ctx"]["S"], cur["ctx"]["start"]
        T = B * S
        keep = T if self.max_tokens is None else max(0, min(T, self.max_tokens - self.kept))
        self.meta["dropped_tokens"] += T - keep
        self.meta["steps"].append(dict(step=cur["step"], start=start, batch=B, seq_len=S, kept=keep))
        if keep == 0:
            return
        t = torch.arange(T)
        tok = cur["ctx"]["tokens"]
        step = dict(token_ids=(tok.reshape(-1).to("cpu", torch.int64) if tok is not None and tok.numel() == T
                               else torch.full((T,), -1, dtype=torch.int64))[:keep],
                    positions=(start + t % S)[:keep], seq=(t // S)[:keep],
                    step=torch.full((keep,), cur["step"], dtype=torch.int64))
        for key in LAYER_KEYS:
            per_layer = [cur["layers"][l].get(key) for l in self.layers]
            if per_layer[0] is not None:
                step[key] = torch.stack([x[:keep] for x in per_layer])
        self.buffer.append(step)
        self.buffered += keep
        self.kept += keep

    def take(self) -> dict:
        """Concatenate and clear the committed buffer -> {name: tensor}."""
        steps, self.buffer, self.buffered = self.buffer, [], 0
        out = {}
        if not steps:
            return out
        for key in steps[0]:
            out[key] = torch.cat([s[key] for s in steps], dim=cat_dim(key))
        return out


class Trace:
    """The ``with dsv3lab.trace(model) as t:`` object. See the module docstring."""

    def __init__(self, model: nn.Module, scores: bool = False, groups: bool = False,
                 max_tokens: Optional[int] = None, stream_to: Optional[str] = None,
                 flush_tokens: int = 65536, mtp: bool = True):
        self.model = model
        self.want_scores, self.want_groups = scores, groups
        self.max_tokens, self.stream_to, self.flush_tokens = max_tokens, stream_to, flush_tokens
        cfg = model.cfg
        self.meta = empty_meta(model)
        self.meta.update(scores=scores, groups=groups, max_tokens=max_tokens)
        self.main_layers = [blk.layer for blk in model.layers if hasattr(blk.mlp, "gate")]
        self.meta["layers"] = self.main_layers
        self.mtp_depths = list(range(len(getattr(model, "mtp", [])))) if mtp else []
        self.streams: dict[str, _Stream] = {"": _Stream(self.main_layers, self.meta, max_tokens)}
        for d in self.mtp_depths:
            m = dict(layers=[cfg.num_hidden_layers + d], steps=[], dropped_tokens=0)
            self.meta["mtp"][str(d)] = m
            self.streams[f"mtp.{d}."] = _Stream(m["layers"], m, max_tokens)
        self.meta["mtp_depths"] = []     # filled with the depths that actually ran, at exit
        self._handles = []
        self._tokens = None              # last ids seen by embed_tokens
        self._ctx: dict[str, dict] = {}  # stream prefix -> {B, S, start, tokens}
        self._partial: dict[int, dict] = {}
        self._passes = 0
        self._chunks: list[str] = []
        self._flushed: dict[str, list[dict]] = {p: [] for p in self.streams}
        self._record: Optional[dict] = None
        # V3.2 models: the indexer's selected keys too, bounded alike (probes/selection.py)
        from dsv3lab.probes.selection import SelectionTrace, indexers
        self.selection = SelectionTrace(model, max_tokens) if indexers(model) else None

    # --- hooks ----------------------------------------------------------------------------
    def _on_embed(self, module, args):
        self._tokens = args[0].detach()

    def _on_block(self, prefix: str, start_arg: int, x_arg: int):
        def pre(module, args, kwargs):
            x = args[x_arg] if len(args) > x_arg else kwargs.get("h", kwargs.get("x"))
            start = args[start_arg] if len(args) > start_arg else kwargs.get("start", 0)
            B, S = x.shape[0], x.shape[1]
            tok = self._tokens if (self._tokens is not None and tuple(self._tokens.shape) == (B, S)) else None
            self._ctx[prefix] = dict(B=B, S=S, start=int(start), tokens=tok)
            if prefix == "":
                if module.layer == self.main_layers[0]:
                    self._passes += 1
                    self.streams[""].begin(self._ctx[""], self._passes - 1)
            else:
                self.streams[prefix].begin(self._ctx[prefix], max(self._passes - 1, 0))
        return pre

    def _on_gate(self, prefix: str, layer: int, key: str):
        stream = self.streams[prefix]

        def hook(module, args, output):
            if stream.max_tokens is not None and stream.kept >= stream.max_tokens:
                if key == "topk_weights" and stream.add(layer, {}):   # budget spent: count, copy nothing
                    stream.commit()
                return None
            part = self._partial.setdefault(layer, {})
            part[key] = output.detach().to("cpu", copy=True)
            if key == "topk_weights":
                entry, self._partial[layer] = part, {}
                if self.want_groups and "group_mask" not in entry:
                    T = entry["topk_ids"].shape[0]
                    entry["group_mask"] = torch.ones(T, self.model.cfg.n_group, dtype=torch.bool)
                if stream.add(layer, entry):
                    stream.commit()
                    if self.stream_to and sum(s.buffered for s in self.streams.values()) >= self.flush_tokens:
                        self._flush()
            return None
        return hook

    def __enter__(self) -> "Trace":
        m = self.model
        self._handles.append(m.embed_tokens.register_forward_pre_hook(self._on_embed))
        gates = []
        for blk in m.layers:
            if hasattr(blk.mlp, "gate"):
                self._handles.append(blk.register_forward_pre_hook(self._on_block("", 3, 0), with_kwargs=True))
                gates.append(("", blk.layer, blk.mlp.gate))
        for d in self.mtp_depths:
            layer = m.mtp[d]
            self._handles.append(layer.register_forward_pre_hook(self._on_block(f"mtp.{d}.", 4, 0),
                                                                 with_kwargs=True))
            gates.append((f"mtp.{d}.", layer.layer, layer.mlp.gate))
        for prefix, idx, gate in gates:
            keys = ["topk_ids", "topk_weights"]
            if self.want_scores:
                keys.append("scores")
            if self.want_groups:
                keys.append("group_mask")
            for key in keys:
                hp = getattr(gate, f"hook_{key}")
                self._handles.append(hp.register_forward_hook(self._on_gate(prefix, idx, key)))
        if self.stream_to:
            os.makedirs(self.stream_to, exist_ok=True)
        if self.selection is not None:
            self.selection.__enter__()
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.selection is not None:
            self.selection.__exit__(*exc)
        for s in self.streams.values():
            if s.current is not None:
                s.current = None
                s.meta["incomplete_steps"] = s.meta.get("incomplete_steps", 0) + 1
        self.meta["mtp_depths"] = [d for d in self.mtp_depths if self.meta["mtp"][str(d)]["steps"]]
        self.meta["mtp"] = {str(d): self.meta["mtp"][str(d)] for d in self.meta["mtp_depths"]}
        if self.stream_to:
            self._flush()
            write_json_atomic(os.path.join(self.stream_to, "trace.json"),
                              dict(self.meta, chunks=[os.path.basename(c) for c in self._chunks]))
        return False

    def _flush(self):
        tensors = {}
        for prefix, s in self.streams.items():
            for k, v in s.take().items():
                tensors[prefix + k] = v
        if not tensors:
            return
        path = os.path.join(self.stream_to, f"chunk-{len(self._chunks):05d}.safetensors")
        save_tensors(tensors, path)
        self._chunks.append(path)

    # --- results --------------------------------------------------------------------------
    def record(self) -> dict:
        """The plain-dict record (see the module docstring). Streamed traces are read back from
        their chunks."""
        if self._record is not None and not self._handles:
            return self._record
        cfg = self.model.cfg
        E, k, G = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group
        if self.stream_to and not self._handles:
            rec = load_trace(self.stream_to)
        else:
            tensors = {}
            for prefix in stream_prefixes(dict(meta=self.meta)):
                s = self.streams[prefix]
                got = _cat_steps(s.buffer)
                empty = empty_stream_tensors(len(s.layers), k, E, G, self.want_scores, self.want_groups)
                for key in empty:
                    tensors[prefix + key] = got.get(key, empty[key])
            rec = dict(tensors=tensors, meta=json.loads(json.dumps(self.meta)))
        if not self._handles:
            self._record = rec
        return rec

    @property
    def routing(self) -> Routing:
        return Routing(self.record(), "")

    @property
    def mtp(self) -> dict[int, Routing]:
        rec = self.record()
        return {d: Routing(rec, f"mtp.{d}.") for d in rec["meta"]["mtp_depths"]}

    def save(self, path: str) -> str:
        return save_trace(self.record(), path)


def _cat_steps(steps: list[dict]) -> dict:
    if not steps:
        return {}
    return {key: torch.cat([s[key] for s in steps], dim=cat_dim(key)) for key in steps[0]}


def trace(model: nn.Module, scores: bool = False, groups: bool = False, max_tokens: Optional[int] = None,
          stream_to: Optional[str] = None, flush_tokens: int = 65536, mtp: bool = True) -> Trace:
    """Record routing while the ``with`` block runs. ``scores``: also the raw [E] scores per token;
    ``groups``: the [G] group mask; ``max_tokens``: keep at most this many tokens per stream;
    ``stream_to``: directory to flush chunks to (bounded memory for long runs)."""
    return Trace(model, scores=scores, groups=groups, max_tokens=max_tokens, stream_to=stream_to,
                 flush_tokens=flush_tokens, mtp=mtp)
