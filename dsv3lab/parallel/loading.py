"""Sharded loading: the ranked entry to the one checkpoint loader (``dsv3lab.checkpoint``).

``load_sharded`` is ``checkpoint.load_checkpoint`` with one step added to its shape step:
``apply_layout`` gives every module of the meta model its per-rank shape and records which
slice of the full weight it holds (``shard = (dim, start, stop)``); the loader then reads
exactly that slice (safetensors slices a memory-mapped file, so the rest of the tensor is never
touched). Routed experts a rank does not own are absent from its model and are never read. The
checks, the FP8 handling, the dtype rule and the error messages are the loader's, so a bad
checkpoint fails the same way on every rank and in one process.

FP8 weights: a rank reads its rows/columns of the e4m3 tensor and the rows/columns of
``weight_scale_inv`` that cover them, ``floor(start/128) .. ceil(stop/128)``; dequantizing
(``fp8="dequant"``, the CPU default) works for any split (``fp8.weight_dequant`` with the
window's offset inside its first block). Keeping FP8 (``fp8="keep"``, for FP8 GEMMs) needs the
split on 128-block boundaries: the one check only a ranked load has, made before any read.
"""

from __future__ import annotations

import math
import os

import torch

from dsv3lab.checkpoint import ShardReader, TensorRead, load_checkpoint, module_key
from dsv3lab.config import ModelConfig
from dsv3lab.model.transformer import Transformer
from dsv3lab.parallel.apply import apply_layout
from dsv3lab.parallel.context import ParallelContext
from dsv3lab.parallel.layout import Layout, LayoutError

# every ShardReader counts what it returns; the old name stays for callers
CountingReader = ShardReader


def load_sharded(path: str, ctx: ParallelContext | Layout | None = None, dtype: torch.dtype | None = None,
                 fp8: str = "dequant", attn_mode: str | None = None, rank: int | None = None,
                 reader: ShardReader | None = None, progress: bool = False, placement=None) -> Transformer:
    """Load this rank's share of a checkpoint directory (official HF layout).

    ``ctx``: this rank's ParallelContext (default ``ParallelContext.init()``), or a Layout and
    ``rank`` to place without process groups (one-rank worlds; tests of what a rank reads).
    ``placement``: physical expert slots (``dsv3lab.parallel.placement``); a rank reads each
    expert its slots hold once, however many of its slots hold it.
    The returned model carries ``model._dsv3_load = {"bytes_read", "tensors_read", "rank", ...}``."""
    path = os.fspath(path)
    if ctx is None:
        ctx = ParallelContext.init()
    elif isinstance(ctx, Layout):
        ctx = ParallelContext.virtual_for(ctx, rank or 0)

    def shard_model(model: Transformer) -> None:
        ctx.layout.validate(model.cfg, ctx.world_size)
        apply_layout(model, ctx, placement=placement)

    def check_reads(reads: list[TensorRead], cfg: ModelConfig) -> None:
        block = cfg.fp8_block_size or 128
        for r in reads:
            if fp8 in ("keep", "quantize") and r.fp8 and r.shard is not None and (r.shard[1] % block or r.shard[2] % block):
                dim, start, stop = r.shard
                raise LayoutError(f"{r.key}: rank {ctx.rank}'s {('rows', 'cols')[dim]} [{start}, {stop}) "
                                  f"do not fall on {block}-blocks, so weight_scale_inv cannot be split for "
                                  f"fp8={fp8!r} under {ctx.layout.describe()}; use fp8='dequant' or another tp")

    if reader is None:                 # mistral4 / glm_moe_dsa as transformers saves them: per-expert views
        from dsv3lab.fused_experts import fused_reader
        reader = fused_reader(path)

    model = load_checkpoint(path, dtype=dtype, device=ctx.device, fp8=fp8, attn_mode=attn_mode,
                            progress=progress, shard_model=shard_model, check_reads=check_reads, reader=reader)
    model._dsv3_load["rank"] = ctx.rank
    return model


def checkpoint_bytes(path: str) -> int:
    """Total bytes of the tensors in a checkpoint directory (from the headers)."""
    r = ShardReader(path)
    total = 0
    for k in r.keys():
        shape = r.shape(k)
        total += math.prod(shape) * torch.tensor([], dtype=r.dtype(k)).element_size()
    return total


__all__ = ["load_sharded", "CountingReader", "checkpoint_bytes", "module_key"]
