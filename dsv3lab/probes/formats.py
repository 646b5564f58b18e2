"""Trace files: dsv3lab's own (safetensors + JSON), SGLang-style counts/records, Megatron-style JSONL.

dsv3lab format -- one ``.safetensors`` file: the record's tensors under their record names
(``topk_ids`` [L,N,k] int64, ``topk_weights`` [L,N,k] fp32, ``token_ids``/``positions``/``seq``/
``step`` [N] int64, optional ``scores``/``group_mask``/``rank``, ``mtp.K.*`` for MTP depth K) and
the record's JSON metadata in the header's ``__metadata__["dsv3lab_trace"]``. A streamed trace is
a directory of ``chunk-NNNNN.safetensors`` plus ``trace.json``. Writes go to a temporary file
beside the target and are renamed over it, so a reader never sees half a file.

SGLang (docs/references.md#sglang-recorder; we write the same dict layout, from our own code):
  * ``stat``: ``{"rank", "logical_count": int64 [steps, num_layers, E],
    "average_utilization_rate_over_window": None}`` -- num_layers counts every model block (dense
    blocks are zero rows), one step per forward pass.
  * ``per_pass``: ``{"records": [{"forward_pass_id", "rank", "input_ids" [T], "positions" [T],
    "forward_mode", "topk_ids_of_layer" [num_layers, T, k] (-1 on dense blocks),
    "global_physical_count" [num_layers, E]}], "last_physical_to_logical_map": None}``. We add
    ``dsv3lab_seq`` and ``dsv3lab_topk_weights`` to each record so our own round trip is exact;
    files from SGLang lack them (seq becomes 0 and weights NaN).
Megatron (docs/references.md#megatron-trace): JSON lines ``{"step", "stage": "pre_dispatch", "block": "decoder", "layer",
"rank", "num_tokens", "topk", "top_indices": [[...]*topk]*num_tokens}``, one per (rank, step,
layer); MTP depth K writes ``block: "mtp"``, ``layer: 0`` and ``mtp_idx: K``. The format carries
no token ids or weights: they import as -1 / NaN.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from dsv3lab.atomic import atomic_write, write_json_atomic as _write_json
from dsv3lab.probes.metrics import expert_load
from dsv3lab.probes.schema import FORMAT, VERSION, cat_dim, empty_stream_tensors, stream_prefixes

META_KEY = "dsv3lab_trace"


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------

def write_json_atomic(path: str, obj) -> str:
    return _write_json(path, obj, indent=1)


def save_tensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> str:
    from safetensors.torch import save_file
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=metadata))


def _read_safetensors(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


# ----------------------------------------------------------------------------------------------
# dsv3lab format
# ----------------------------------------------------------------------------------------------

def save_trace(record: dict, path: str) -> str:
    """Write a record to ``path`` (.safetensors, JSON metadata in the header), atomically."""
    return save_tensors(record["tensors"], path, {META_KEY: json.dumps(record["meta"])})


def load_trace(path: str) -> dict:
    """Read a record written by ``save_trace`` (a file) or by ``trace(stream_to=DIR)`` (a dir)."""
    if os.path.isdir(path):
        with open(os.path.join(path, "trace.json")) as f:
            meta = json.load(f)
        chunks = [_read_safetensors(os.path.join(path, c))[0] for c in meta.pop("chunks", [])]
        tensors = {}
        for prefix in stream_prefixes(dict(meta=meta)):
            n_layers = len(meta["layers"] if not prefix else meta["mtp"][prefix.split(".")[1]]["layers"])
            empty = empty_stream_tensors(n_layers, meta["top_k"], meta["n_routed_experts"], meta["n_group"],
                                         bool(meta.get("scores")), bool(meta.get("groups")), prefix)
            for key, e in empty.items():
                parts = [c[key] for c in chunks if key in c]
                tensors[key] = torch.cat(parts, dim=cat_dim(key[len(prefix):])) if parts else e
        return dict(tensors=tensors, meta=meta)
    tensors, header = _read_safetensors(path)
    if META_KEY not in header:
        raise ValueError(f"{path}: not a dsv3lab trace (no {META_KEY!r} metadata)")
    meta = json.loads(header[META_KEY])
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return dict(tensors=tensors, meta=meta)


# ----------------------------------------------------------------------------------------------
# SGLang
# ----------------------------------------------------------------------------------------------

def _step_slices(record: dict, prefix: str = ""):
    """(step id, index tensor of that step's tokens) in record order, one per step in meta."""
    t = record["tensors"]
    step = t[prefix + "step"]
    rank = t.get(prefix + "rank")
    steps = record["meta"]["steps"] if not prefix else record["meta"]["mtp"][prefix.split(".")[1]]["steps"]
    seen = []
    for s in steps:
        if s["step"] not in seen:
            seen.append(s["step"])
    for sid in seen:
        idx = (step == sid).nonzero().flatten()
        yield sid, idx, rank


def to_sglang(record: dict, path: Optional[str] = None, mode: str = "stat") -> dict:
    """SGLang expert-distribution dump of the main stream; also ``torch.save``d to ``path``."""
    meta, t = record["meta"], record["tensors"]
    L, E, k = meta["num_hidden_layers"], meta["n_routed_experts"], meta["top_k"]
    layers = meta["layers"]
    rank = int(meta.get("rank", 0))
    if mode == "stat":
        counts = []
        for _, idx, _ in _step_slices(record):
            c = torch.zeros(L, E, dtype=torch.int64)
            c[layers] = expert_load(t["topk_ids"][:, idx], E)
            counts.append(c)
        obj = dict(rank=rank, logical_count=torch.stack(counts) if counts else torch.zeros(0, L, E, dtype=torch.int64),
                   average_utilization_rate_over_window=None)
    elif mode == "per_pass":
        recs = []
        starts = {s["step"]: s["start"] for s in meta["steps"]}
        for sid, idx, _ in _step_slices(record):
            ids = torch.full((L, idx.numel(), k), -1, dtype=torch.int64)
            ids[layers] = t["topk_ids"][:, idx]
            count = torch.zeros(L, E, dtype=torch.int64)
            count[layers] = expert_load(t["topk_ids"][:, idx], E)
            recs.append(dict(forward_pass_id=int(sid), rank=rank, input_ids=t["token_ids"][idx].clone(),
                             positions=t["positions"][idx].clone(),
                             forward_mode="extend" if starts.get(sid, 0) == 0 else "decode",
                             topk_ids_of_layer=ids, global_physical_count=count,
                             dsv3lab_seq=t["seq"][idx].clone(),
                             dsv3lab_topk_weights=t["topk_weights"][:, idx].clone()))
        obj = dict(records=recs, last_physical_to_logical_map=None)
    else:
        raise ValueError(f"mode must be 'stat' or 'per_pass', got {mode!r}")
    if path:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return obj


def from_sglang(obj_or_path, moe_layers: Optional[list[int]] = None, n_group: int = 1,
                topk_group: int = 1) -> dict:
    """Read an SGLang dump. ``stat`` -> ``{"logical_count": [steps, num_layers, E], "rank"}``;
    ``per_pass`` -> a dsv3lab record (main stream). ``moe_layers`` picks the MoE blocks out of
    the dump's layer axis (default: every layer with any non-(-1) id)."""
    obj = obj_or_path
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(obj, map_location="cpu", weights_only=False)
    if "logical_count" in obj:
        return dict(logical_count=obj["logical_count"], rank=obj.get("rank", 0))
    recs = obj["records"]
    if not recs:
        raise ValueError("SGLang dump holds no records")
    num_layers, _, k = recs[0]["topk_ids_of_layer"].shape
    E = int(recs[0]["global_physical_count"].shape[-1]) if "global_physical_count" in recs[0] else None
    if moe_layers is None:
        moe_layers = [l for l in range(num_layers) if any((r["topk_ids_of_layer"][l] >= 0).any() for r in recs)]
    if E is None:
        E = int(max(int(r["topk_ids_of_layer"].max()) for r in recs)) + 1
    tensors = {key: [] for key in ("token_ids", "positions", "seq", "step", "topk_ids", "topk_weights")}
    steps = []
    for r in recs:
        n = int(r["input_ids"].numel())
        tensors["token_ids"].append(torch.as_tensor(r["input_ids"]).to(torch.int64).reshape(-1))
        tensors["positions"].append(torch.as_tensor(r["positions"]).to(torch.int64).reshape(-1))
        tensors["seq"].append(torch.as_tensor(r.get("dsv3lab_seq", torch.zeros(n, dtype=torch.int64))).to(torch.int64))
        tensors["step"].append(torch.full((n,), int(r["forward_pass_id"]), dtype=torch.int64))
        tensors["topk_ids"].append(torch.as_tensor(r["topk_ids_of_layer"])[moe_layers].to(torch.int64))
        w = r.get("dsv3lab_topk_weights")
        tensors["topk_weights"].append(w if w is not None else torch.full((len(moe_layers), n, k), float("nan")))
        seq = tensors["seq"][-1]
        S = int(seq.eq(0).sum()) if n else 0
        steps.append(dict(step=int(r["forward_pass_id"]), start=int(tensors["positions"][-1].min()) if n else 0,
                          batch=int(seq.max()) + 1 if n else 0, seq_len=S, kept=n))
    out = {key: torch.cat(v, dim=cat_dim(key)) for key, v in tensors.items()}
    meta = dict(format=FORMAT, version=VERSION, model="sglang", n_routed_experts=E, top_k=int(k),
                n_group=n_group, topk_group=topk_group, num_hidden_layers=int(num_layers),
                layers=list(moe_layers), steps=steps, dropped_tokens=0, mtp_depths=[], mtp={},
                rank=int(recs[0].get("rank", 0)), world_size=1, source="sglang")
    return dict(tensors=out, meta=meta)


# ----------------------------------------------------------------------------------------------
# Megatron
# ----------------------------------------------------------------------------------------------

def to_megatron(record: dict, path: Optional[str] = None, stage: str = "pre_dispatch") -> list[dict]:
    """Megatron routing-trace lines for every stream; written as JSONL to ``path`` if given."""
    lines = []
    for prefix in stream_prefixes(record):
        t = record["tensors"]
        ids = t[prefix + "topk_ids"]
        rank_t = t.get(prefix + "rank")
        rank_default = int(record["meta"].get("rank", 0))
        if prefix:
            depth = int(prefix.split(".")[1])
            layers, block = [0], "mtp"
        else:
            layers, block = record["meta"]["layers"], "decoder"
        ranks = sorted(set(rank_t.tolist())) if rank_t is not None else [rank_default]
        for r in ranks:
            for sid, idx, _ in _step_slices(record, prefix):
                if rank_t is not None:
                    idx = idx[rank_t[idx] == r]
                for li, layer in enumerate(layers):
                    line = dict(step=int(sid), stage=stage, block=block, layer=int(layer), rank=int(r),
                                num_tokens=int(idx.numel()), topk=int(ids.shape[-1]),
                                top_indices=ids[li, idx].tolist())
                    if prefix:
                        line["mtp_idx"] = depth
                    lines.append(line)
    if path:
        def w(tmp):
            with open(tmp, "w") as f:
                for line in lines:
                    f.write(json.dumps(line) + "\n")
        atomic_write(path, w)
    return lines


def from_megatron(lines_or_path, n_routed_experts: Optional[int] = None) -> dict:
    """A dsv3lab record from Megatron trace lines (main ``decoder`` block and any ``mtp`` lines).
    Tokens are ordered by (rank, step); token ids, positions and weights are unknown (-1/NaN)."""
    lines = lines_or_path
    if isinstance(lines, (str, os.PathLike)):
        with open(lines) as f:
            lines = [json.loads(x) for x in f if x.strip()]
    streams: dict[str, dict] = {}
    for ln in lines:
        key = "" if ln.get("block", "decoder") != "mtp" else f"mtp.{int(ln.get('mtp_idx', 0))}."
        streams.setdefault(key, {}).setdefault((int(ln.get("rank", 0)), int(ln["step"])), {})[int(ln["layer"])] = ln
    if "" not in streams:
        raise ValueError("no decoder lines in the Megatron trace")
    k = int(lines[0]["topk"])
    E = n_routed_experts or 1 + max((max((max(row) for row in ln["top_indices"]), default=-1) for ln in lines), default=0)
    tensors, meta_streams = {}, {}
    for prefix, by_step in streams.items():
        layers = sorted({l for per in by_step.values() for l in per})
        ids, step, rank, steps = [], [], [], []
        for (r, s) in sorted(by_step):
            per = by_step[(r, s)]
            n = int(per[layers[0]]["num_tokens"])
            ids.append(torch.tensor([per[l]["top_indices"] for l in layers], dtype=torch.int64).reshape(len(layers), n, k))
            step.append(torch.full((n,), s, dtype=torch.int64))
            rank.append(torch.full((n,), r, dtype=torch.int64))
            steps.append(dict(step=s, start=-1, batch=-1, seq_len=-1, kept=n))
        N = sum(x.shape[1] for x in ids)
        tensors[prefix + "topk_ids"] = torch.cat(ids, dim=1)
        tensors[prefix + "topk_weights"] = torch.full((len(layers), N, k), float("nan"))
        tensors[prefix + "step"] = torch.cat(step)
        tensors[prefix + "rank"] = torch.cat(rank)
        for key in ("token_ids", "positions", "seq"):
            tensors[prefix + key] = torch.full((N,), -1, dtype=torch.int64)
        meta_streams[prefix] = dict(layers=layers, steps=steps, dropped_tokens=0)
    main = meta_streams[""]
    depths = sorted(int(p.split(".")[1]) for p in meta_streams if p)
    meta = dict(format=FORMAT, version=VERSION, model="megatron", n_routed_experts=int(E), top_k=k,
                n_group=1, topk_group=1, num_hidden_layers=max(main["layers"]) + 1, layers=main["layers"],
                steps=main["steps"], dropped_tokens=0, mtp_depths=depths,
                mtp={str(d): meta_streams[f"mtp.{d}."] for d in depths},
                rank=0, world_size=len({r for (r, _) in streams[""]}), source="megatron")
    return dict(tensors=tensors, meta=meta)
