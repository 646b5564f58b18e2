"""Routed experts paged from the checkpoint's shards, for models larger than memory.

``dsv3lab.load(path, fp8="keep", max_memory=GB)`` holds the dense part as the loader always
does (attention, dense and shared FFNs, gates, norms, embedding and head; mapped or copied) and
none of the routed experts. Each ``moe.experts[e]`` becomes a ``PagedExpert``: when a token is
routed to it, it asks the ``ExpertPager`` for its MLP, which returns it from an LRU of experts
in memory of our own or reads its three weights from the shard files with ``pread`` (the page
cache may serve them; they never land in this process's mapping, so evicting an expert returns
its memory). The LRU holds what ``max_memory`` leaves after the dense part.

Reading on demand stalls every layer on the disk. Two prefetches overlap the reads with compute,
on one reader thread (``pread`` releases the GIL):
- the current layer: as soon as its gate has chosen, every chosen expert not in memory is queued,
  so the reads of experts 2..k run while expert 1 computes;
- the next layer, predicted: the next MoE layer's gate applied to the current layer's input
  (the residual stream changes little from one layer to the next, so its routing is a good
  guess), its top-k queued behind the current layer's.
A wrong guess costs a read and a slot of the LRU, never a wrong result: an expert is always the
one the real gate chose. ``pager.stats()`` says the hit rate (requests served from memory without
waiting on a read), bytes read, and how many prefetched experts were used.

The checks the loader makes on every tensor (finite weights, scales finite, >= 0, powers of two
under ue8m0) are made when an expert is first read; shapes and scale grids are checked at load
from the headers, as for every tensor.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from dsv3lab.model.layers import MLP
from dsv3lab.model.moe import MoE

ROUTED_RE = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class PagedExpert(nn.Module):
    """Stands in ``moe.experts[e]``: no weights of its own, its MLP from the pager per call."""

    def __init__(self, pager: "ExpertPager", layer: str, expert: int):
        super().__init__()
        self.layer, self.expert = layer, expert
        self._pager = [pager]            # a list: not registered as a submodule or state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pager[0].get(self.layer, self.expert)(x)

    def extra_repr(self) -> str:
        return f"{self.layer}.experts.{self.expert}, paged"


class ExpertPager:
    """An LRU of routed experts read from the shards, with prefetch (module docstring)."""

    def __init__(self, reader, cfg, reads: dict, fp8: str, capacity_bytes: int, expert_bytes: int,
                 prefetch: bool = True):
        self.reader, self.cfg, self.fp8 = reader, cfg, fp8
        self.reads = reads                       # (layer, e) -> {proj: TensorRead}
        self.capacity, self.expert_bytes = capacity_bytes, expert_bytes
        self.cache: OrderedDict = OrderedDict()  # (layer, e) -> MLP
        self.pending: dict = {}                  # (layer, e) -> Future[MLP]
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dsv3lab-pager") if prefetch else None
        self.prefetch_on = prefetch
        self._fds: dict[str, int] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.requests = self.hits = self.waits = self.misses = 0
        self.prefetched = self.prefetch_used = 0
        self.bytes_read = 0

    def stats(self) -> dict:
        return dict(requests=self.requests, hits=self.hits, waited_on_prefetch=self.waits, misses=self.misses,
                    hit_rate=self.hits / max(self.requests, 1), prefetched=self.prefetched,
                    prefetch_used=self.prefetch_used, bytes_read=self.bytes_read,
                    resident_experts=len(self.cache), capacity_experts=self.capacity // max(self.expert_bytes, 1))

    # -- reading ---------------------------------------------------------------------------------
    def _pread(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        m = self.reader.mapping(key)
        off, n = m.span(key)
        buf = torch.empty(n, dtype=torch.uint8)
        if hasattr(os, "preadv"):
            fd = self._fds.get(m.file)
            if fd is None:
                fd = self._fds.setdefault(m.file, os.open(m.file, os.O_RDONLY))
            got = os.preadv(fd, [memoryview(buf.numpy())], off)
            if got != n:
                from dsv3lab.checkpoint import CheckpointError
                raise CheckpointError(f"{m.file}: tensor {key!r}: read {got} of {n} bytes; the file may be truncated")
        else:                                  # no preadv: copy out of the mapping
            buf.copy_(m.bytes[off:off + n])
        with self.lock:
            self.bytes_read += n
        return buf.view(dtype).view(m.header[key]["shape"])

    def _read(self, layer: str, e: int) -> MLP:
        from dsv3lab.checkpoint import check_finite, check_scales
        from dsv3lab.fp8 import weight_dequant, weight_quant
        b = self.cfg.fp8_block_size or 128
        mlp = None
        for proj, r in self.reads[(layer, e)].items():
            t = self._pread(r.key, self.reader.dtype(r.key))
            check_finite(self.reader, r.key, t)
            s = None
            if r.fp8:
                sk = r.key + "_scale_inv"
                s = self._pread(sk, self.reader.dtype(sk)).float()
                check_scales(self.reader, sk, s, self.cfg.scale_fmt)
                if self.fp8 == "dequant":
                    t, s = weight_dequant(t, s, b, r.dtype), None
            elif self.fp8 == "quantize":
                t, s = weight_quant(t, b, scale_fmt=self.cfg.scale_fmt)
            elif t.dtype != r.dtype:
                t = t.to(r.dtype)
            if mlp is None:
                mlp = MLP(1, 1, device="meta")
            lin = getattr(mlp, proj)
            lin.in_features, lin.out_features = t.shape[1], t.shape[0]
            lin.weight = nn.Parameter(t, requires_grad=False)
            lin.weight_scale_inv = s
        return mlp.eval()

    # -- the LRU ---------------------------------------------------------------------------------
    def get(self, layer: str, e: int) -> MLP:
        key = (layer, e)
        with self.lock:
            self.requests += 1
            mlp = self.cache.get(key)
            if mlp is not None:
                self.cache.move_to_end(key)
                self.hits += 1
                return mlp
            fut = self.pending.pop(key, None)
        if fut is not None:
            if fut.done():
                self.hits += 1
            else:
                self.waits += 1
            self.prefetch_used += 1
            mlp = fut.result()
        else:
            self.misses += 1
            mlp = self._read(layer, e)
        with self.lock:
            self._insert(key, mlp)
        return mlp

    def _insert(self, key, mlp: MLP) -> None:
        self.cache[key] = mlp
        self.cache.move_to_end(key)
        while len(self.cache) * self.expert_bytes > self.capacity and len(self.cache) > 1:
            self.cache.popitem(last=False)

    def prefetch(self, layer: str, experts, only: bool = False) -> None:
        """Queue reads of these experts of ``layer`` (those not in memory or queued already).
        ``only``: these are the layer's real choice; reads queued for its other experts (a
        prediction that missed) are dropped."""
        if self.pool is None:
            return
        room = max(self.capacity // max(self.expert_bytes, 1) - 1, 0)
        with self.lock:
            if only:
                want = {int(e) for e in experts}
                for key in [k for k in self.pending if k[0] == layer and k[1] not in want]:
                    self.pending.pop(key).cancel()
            for e in experts:
                key = (layer, int(e))
                if key in self.cache or key in self.pending:
                    continue
                if len(self.pending) >= room:
                    break
                self.pending[key] = self.pool.submit(self._read, layer, int(e))
                self.prefetched += 1

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _predict(gate, x: torch.Tensor, k: int) -> list[int]:
    """The experts ``gate`` would pick for the last token of ``x`` [T, D], by biased scores,
    without the group limit (a guess for prefetching; the gate's hooks do not fire)."""
    cfg = gate.cfg
    logits = F.linear(x[-1:].float(), gate.weight.float())
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    if gate.e_score_correction_bias is not None:
        scores = scores + gate.e_score_correction_bias.float()
    return scores[0].topk(k).indices.tolist()


def page_experts(model, reader, cfg, paged_reads: list, fp8: str, max_memory_bytes: int,
                 resident_bytes: int, prefetch: bool = True) -> ExpertPager:
    """Replace every routed expert named in ``paged_reads`` (the loader's TensorReads of routed
    expert weights, not read) by a ``PagedExpert`` of one ``ExpertPager``; install the
    prefetch hooks on the MoE gates. Returns the pager (also ``model.pager``)."""
    reads: dict = {}
    for r in paged_reads:
        m = ROUTED_RE.match(r.name)
        reads.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = r
    if not reads:
        raise ValueError("max_memory: this model has no routed experts to page")
    expert_bytes = max(sum(_bytes_held(r, fp8, reader) for r in rs.values()) for rs in reads.values())
    capacity = max_memory_bytes - resident_bytes
    need = 2 * cfg.num_experts_per_tok * expert_bytes
    if capacity < need:
        raise ValueError(f"max_memory={max_memory_bytes / 1e9:.3g} GB leaves {capacity / 1e9:.3g} GB for experts "
                         f"after the dense part's {resident_bytes / 1e9:.3g} GB; paging needs at least "
                         f"{need / 1e9:.3g} GB (two layers' top-{cfg.num_experts_per_tok} experts)")
    pager = ExpertPager(reader, cfg, reads, fp8, capacity, expert_bytes, prefetch)
    moes = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MoE)]
    for name, moe in moes:
        for e in range(len(moe.experts)):
            if (name, e) in reads:
                moe.experts[e] = PagedExpert(pager, name, e)
    if prefetch:
        main = [(n, m) for n, m in moes if n.startswith("layers.")]
        nxt = {main[i][0]: main[i + 1] for i in range(len(main) - 1)}
        k = cfg.num_experts_per_tok
        for name, moe in moes:
            def hook(gate, args, out, name=name, after=nxt.get(name)):
                pager.prefetch(name, out[0].flatten().unique().tolist(), only=True)
                if after is not None:
                    pager.prefetch(after[0], _predict(after[1].gate, args[0], k))
            moe.gate.register_forward_hook(hook)
    model.pager = pager
    return pager


def _bytes_held(r, fp8: str, reader) -> int:
    """Bytes one paged weight takes in memory (its scales aside: 1/16384 of it)."""
    n = r.full_shape[0] * r.full_shape[1]
    from dsv3lab.checkpoint import is_fp8_key
    if fp8 != "dequant" and (r.fp8 or (fp8 == "quantize" and is_fp8_key(r.key))):
        return n
    return n * r.dtype.itemsize
