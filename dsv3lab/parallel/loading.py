"""Sharded loading: each rank reads only its slices of the safetensors files.

The model is built on the meta device, ``apply_layout`` gives every module its per-rank shape and
records which slice of the full weight it holds (``shard = (dim, start, stop)``); the loader then
reads exactly that slice through ``ShardReader.get(key, rows=, cols=)`` (safetensors slices a
memory-mapped file, so the rest of the tensor is never touched). Routed experts a rank does not
own are absent from its model and are never read.

FP8 weights: the rank reads its rows/columns of the e4m3 tensor and the rows/columns of
``weight_scale_inv`` that cover them, ``floor(start/128) .. ceil(stop/128)``. Dequantizing
(``fp8="dequant"``, the CPU default) works for any split: the scale blocks are expanded and cut
at the slice's offset inside its first block. Keeping FP8 (``fp8="keep"``, for FP8 GEMMs) needs
the split on 128-block boundaries, checked before any tensor is read.

Everything that can be checked from the file headers (missing tensors, shapes, scale shapes, FP8
alignment) is checked for *all* of this rank's tensors before the first read.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from dsv3lab.checkpoint import CheckpointError, ShardReader, hf_key, module_key, place, read_config, resolve
from dsv3lab.model.transformer import Transformer
from dsv3lab.parallel.apply import apply_layout
from dsv3lab.parallel.context import ParallelContext
from dsv3lab.parallel.layout import Layout, LayoutError


class CountingReader(ShardReader):
    """ShardReader that counts the bytes each ``get`` returns (what this rank read)."""

    def __init__(self, path: str):
        super().__init__(path)
        self.bytes_read = 0
        self.tensors_read = 0

    def get(self, key, rows=None, cols=None):
        t = super().get(key, rows=rows, cols=cols)
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t


def _window(shard):
    """(rows, cols) slices of the full tensor that a shard covers."""
    if shard is None:
        return None, None
    dim, start, stop = shard
    s = slice(start, stop)
    return (s, None) if dim == 0 else (None, s)


def _dequant_window(q: torch.Tensor, scale: torch.Tensor, r0: int, c0: int, block: int, dtype) -> torch.Tensor:
    """Dequantize rows/cols of a weight that start at (r0, c0) of the full tensor, given the scale
    blocks that cover them (scale[0, 0] is block (r0 // block, c0 // block))."""
    M, N = q.shape
    ro, co = r0 % block, c0 % block
    s = scale.float().repeat_interleave(block, 0)[ro:ro + M].repeat_interleave(block, 1)[:, co:co + N]
    return (q.float() * s).to(dtype)


def load_sharded(path: str, ctx: ParallelContext | Layout | None = None, dtype: torch.dtype | None = None,
                 fp8: str = "dequant", attn_mode: str = "absorbed", rank: int | None = None,
                 reader: ShardReader | None = None) -> Transformer:
    """Load this rank's share of a checkpoint directory (official HF layout).

    ``ctx``: this rank's ParallelContext (default ``ParallelContext.init()``), or a Layout and
    ``rank`` to place without process groups (one-rank worlds; tests of what a rank reads).
    The returned model carries ``model._dsv3_load = {"bytes_read", "tensors_read", ...}``."""
    path = os.fspath(path)
    cfg = read_config(path)
    if ctx is None:
        ctx = ParallelContext.init()
    elif isinstance(ctx, Layout):
        ctx = ParallelContext.virtual_for(ctx, rank or 0)
    ctx.layout.validate(cfg, ctx.world_size)
    if fp8 not in ("dequant", "keep"):
        raise ValueError(f"fp8 must be 'dequant' or 'keep', got {fp8!r}")
    reader = reader or CountingReader(path)
    keys = set(reader.keys())
    cfg, dtype = resolve(path, cfg, reader, dtype)
    model = Transformer(cfg, dtype, "meta")
    apply_layout(model, ctx)
    block = cfg.fp8_block_size or 128

    # --- plan: every tensor this rank needs, checked against the headers before any read ----
    plan = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("weight_scale_inv"):
            continue
        key = hf_key(cfg, name)
        mod_name, attr = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        shard = getattr(mod, "shard", None) if attr == "weight" else None
        if key not in keys:
            raise CheckpointError(f"{path}: tensor {key!r} (rank {ctx.rank}'s {name}) is missing from the checkpoint")
        got = reader.shape(key)
        want = list(t.shape)
        if shard is not None:
            want[shard[0]] = None
        full = [g if w is None else w for g, w in zip(got, want)] if len(got) == len(want) else None
        if full is None or tuple(full) != tuple(got) or (shard is not None and got[shard[0]] < shard[2]):
            raise CheckpointError(f"{path}/{reader.weight_map[key]}: tensor {key!r} has shape {list(got)}; "
                                  f"rank {ctx.rank} needs {list(t.shape)}"
                                  + (f" at {('rows', 'cols')[shard[0]]} [{shard[1]}, {shard[2]})" if shard else ""))
        is_fp8 = hasattr(reader, "dtype") and reader.dtype(key) in (torch.float8_e4m3fn, torch.float8_e5m2)
        if is_fp8:
            sk = key + "_scale_inv"
            if sk not in keys:
                raise CheckpointError(f"{path}: FP8 tensor {key!r} has no {sk!r}")
            want_s = (math.ceil(got[0] / block), math.ceil(got[1] / block))
            if reader.shape(sk) != want_s:
                raise CheckpointError(f"{path}/{reader.weight_map[sk]}: tensor {sk!r} has shape "
                                      f"{list(reader.shape(sk))}, a {list(got)} weight needs {list(want_s)}")
            if fp8 == "keep" and shard is not None and (shard[1] % block or shard[2] % block):
                raise LayoutError(f"{key}: rank {ctx.rank}'s {('rows', 'cols')[shard[0]]} [{shard[1]}, {shard[2]}) "
                                  f"do not fall on {block}-blocks, so weight_scale_inv cannot be split for "
                                  f"fp8='keep' under {ctx.layout.describe()}; use fp8='dequant' or another tp")
        plan.append((name, key, mod, attr, t, shard, is_fp8))

    # --- read ----------------------------------------------------------------------------------
    dev = ctx.device
    for name, key, mod, attr, meta_t, shard, is_fp8 in plan:
        rows, cols = _window(shard)
        target = meta_t.dtype     # the meta model already says: fp32 gate/bias, `dtype` elsewhere
        t = reader.get(key, rows=rows, cols=cols)
        if is_fp8:
            r0 = rows.start if rows is not None else 0
            c0 = cols.start if cols is not None else 0
            r1 = rows.stop if rows is not None else t.shape[0]
            c1 = cols.stop if cols is not None else t.shape[1]
            srows = slice(r0 // block, math.ceil(r1 / block))
            scols = slice(c0 // block, math.ceil(c1 / block))
            s = reader.get(key + "_scale_inv", rows=srows, cols=scols).float()
            if fp8 == "keep" and isinstance(getattr(mod, "weight", None), nn.Parameter):
                mod.weight = nn.Parameter(t.to(dev), requires_grad=False)
                mod.register_buffer("weight_scale_inv", s.to(dev))
                continue
            t = _dequant_window(t, s, r0, c0, block, target if target.is_floating_point else dtype)
        place(mod, attr, t.to(device=dev, dtype=target))
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: rank {ctx.rank} left {len(left)} tensor(s) unloaded, e.g. {left[:3]}")
    model._dsv3_load = dict(path=path, bytes_read=getattr(reader, "bytes_read", None),
                            tensors_read=getattr(reader, "tensors_read", None), rank=ctx.rank)
    return model.set_attn_mode(attn_mode).eval()


def checkpoint_bytes(path: str) -> int:
    """Total bytes of the tensors in a checkpoint directory (from the headers)."""
    r = CountingReader(path)
    total = 0
    for k in r.keys():
        shape = r.shape(k)
        total += math.prod(shape) * torch.tensor([], dtype=r.dtype(k)).element_size()
    return total


__all__ = ["load_sharded", "CountingReader", "checkpoint_bytes", "module_key"]
