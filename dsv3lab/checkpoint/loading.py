"""Loading: one shape / check / read loop for one process and for one rank of many
(docs/checkpoints.md).

  shape  build the model on the meta device (``dsv3lab.parallel`` first turns it into one rank's
         share: each split module says which window of the full weight it holds);
  check  from the index and the file headers alone, before any tensor is read: missing,
         unexpected and orphaned tensors (whole model, every rank alike), then each needed
         tensor's shape and FP8 scale grid (``reads_for``);
  read   each tensor's window only, a view of the shard's memory mapping (``ShardMap``), then by
         ``fp8``: "dequant" dequantizes (``dsv3lab.fp8.weight_dequant``) and copies every tensor
         into memory of our own; "keep" leaves FP8 weights and every tensor already in the model's
         dtype as views of the mapping (zero copy); "quantize" also turns bf16 weights the releases
         store in FP8 into e4m3 + scales (``read_tensors``).
``load`` is the one-rank case; ``dsv3lab.parallel.load_sharded`` is the ranked entry. With
``max_memory`` the routed experts are not read here but paged from the shards (``dsv3lab.paging``).
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dsv3lab.checkpoint.arena import HugeArena
from dsv3lab.checkpoint.keys import hf_key, is_fp8_key, module_key
from dsv3lab.checkpoint.reader import FP8_DTYPES, CheckpointError, ShardReader, read_config
from dsv3lab.config import ModelConfig
from dsv3lab.model.layers import Linear
from dsv3lab.model.transformer import Transformer


def config_and_dtype(path: str, cfg: ModelConfig, reader: ShardReader, dtype):
    """What the checkpoint itself decides: MTP dropped when its layer is absent (as transformers
    and the official converter save V3), and the compute dtype defaulting to the embedding's."""
    keys = set(reader.keys())
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{n}.") for k in keys):
        warnings.warn(f"{path}: config has num_nextn_predict_layers={cfg.num_nextn_predict_layers} "
                      f"but the checkpoint holds no layer {n}; loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if dtype is None:
        k = "model.embed_tokens.weight"
        dtype = reader.dtype(k) if k in keys else torch.bfloat16
    return cfg, dtype


def place(mod: nn.Module, attr: str, t: torch.Tensor) -> None:
    """Put a loaded tensor in place of a meta parameter or buffer (no copy, no grad)."""
    if attr in mod._buffers:
        mod._buffers[attr] = t
    else:
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)


def own_copy(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a fresh contiguous tensor from torch's allocator (64-byte aligned on CPU).

    safetensors hands out tensors whose data sits at whatever offset its buffer gives (48 bytes
    into a line, say); a GEMM library may pick another kernel for an unaligned operand, so a
    loaded model and a built one with the same weights would round differently. One copy into
    our own allocation gives loaded weights exactly the layout ``build`` gives its own."""
    out = torch.empty(t.shape, dtype=dtype, device=device)
    out.copy_(t)
    return out


@dataclass
class TensorRead:
    """One tensor to read: where it comes from and where it goes."""
    key: str                         # checkpoint key
    name: str                        # module state-dict name
    module: nn.Module
    attr: str
    dtype: torch.dtype               # what the model holds (fp32 gate and bias, ``dtype`` elsewhere)
    shard: tuple | None              # (dim, start, stop) of the full tensor this rank holds
    fp8: bool                        # stored e4m3/e5m2, with ``key + "_scale_inv"`` beside it
    full_shape: tuple[int, ...]

    @property
    def window(self) -> tuple[slice | None, slice | None]:
        if self.shard is None:
            return None, None
        dim, start, stop = self.shard
        return (slice(start, stop), None) if dim == 0 else (None, slice(start, stop))


def check_keys(path: str, cfg: ModelConfig, keys: set[str], expected: set[str]) -> None:
    """Missing, unexpected and orphaned tensors, from the index alone (nothing is opened). The
    same whole-model check on every rank, so every rank of a run gives the same error."""
    scale_keys = {k for k in keys if k.endswith("_scale_inv")}
    copies = {k for k in keys if module_key(cfg, k) is None}
    missing = sorted(expected - keys)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                              f"{missing[:5]}")
    extra = sorted(keys - expected - scale_keys - copies)
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected tensor(s) in the checkpoint, e.g. {extra[:5]}")
    orphan = sorted(k for k in scale_keys if k[:-len("_scale_inv")] not in keys)
    if orphan:
        raise CheckpointError(f"{path}: weight_scale_inv without its weight: {orphan[:5]}")


def reads_for(path: str, cfg: ModelConfig, reader: ShardReader, model: Transformer,
               full_shapes: dict[str, tuple[int, ...]]) -> list[TensorRead]:
    """Every tensor ``model`` (a meta model, possibly one rank's share) needs, checked against
    the file headers before any tensor is read: shape against the whole model's, FP8 scale
    present and of the right block grid. In checkpoint-key order, so errors come out the same
    whichever rank or entry point meets them first."""
    from dsv3lab.fp8 import check_scale_shape
    keys = set(reader.keys())
    block = cfg.fp8_block_size or 128
    reads = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("weight_scale_inv"):
            continue
        key = hf_key(cfg, name)
        mod_name, attr = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        shard = getattr(mod, "shard", None) if attr == "weight" else None
        reads.append(TensorRead(key, name, mod, attr, t.dtype, shard, False, full_shapes[key]))
    reads.sort(key=lambda r: r.key)
    for r in reads:
        got = reader.shape(r.key)
        if got != r.full_shape:
            raise CheckpointError(f"{reader.file(r.key)}: tensor {r.key!r} has shape {list(got)}, "
                                  f"the config needs {list(r.full_shape)}")
        r.fp8 = reader.dtype(r.key) in FP8_DTYPES
        if r.fp8:
            sk = r.key + "_scale_inv"
            if sk not in keys:
                raise CheckpointError(f"{path}: FP8 tensor {r.key!r} has no {sk!r}")
            try:
                if len(got) != 2:
                    raise ValueError(f"an FP8 weight must be 2-D, got shape {list(got)}")
                check_scale_shape(got[0], got[1], reader.shape(sk), block)
            except ValueError as e:
                raise CheckpointError(f"{reader.file(sk)}: tensor {sk!r}: {e}") from None
    return reads


def check_scales(reader: ShardReader, sk: str, s: torch.Tensor, scale_fmt: str | None,
                 at: tuple[int, int] = (0, 0)) -> None:
    """FP8 scales must be finite and >= 0 (else the weights come out NaN or sign-flipped), and
    powers of two under ``scale_fmt="ue8m0"``. A rank checks the window it reads (``at``: the
    window's first block), and names a bad block by its place in the whole grid."""
    from dsv3lab.fp8 import is_pow2
    for bad, what in ((~torch.isfinite(s) | (s < 0), "negative or non-finite"),
                      (~is_pow2(s) if scale_fmt == "ue8m0" else None, "not powers of two")):
        if bad is not None and bad.any():
            j = [int(v) for v in bad.nonzero()[0]]
            i = [j[0] + at[0], j[1] + at[1]]
            why = " although config.json says quantization_config.scale_fmt='ue8m0'" \
                if what == "not powers of two" else ""
            raise CheckpointError(f"{reader.file(sk)}: tensor {sk!r} holds scale(s) that are "
                                  f"{what} (e.g. {s[tuple(j)].item()!r} at block {i}){why}")


def check_finite(reader: ShardReader, key: str, t: torch.Tensor) -> None:
    """No NaN or infinity in a weight (a corrupt file would otherwise give a model that runs and
    returns NaN). e4m3fn has no infinity; its NaN is the bit pattern S.1111.111."""
    if not t.is_floating_point():
        return
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)
    step = 1 << 22                 # in pieces: the masks of a 671 MB head would be 670 MB more
    for i in range(0, flat.numel(), step):
        x = flat[i:i + step]
        if t.dtype == torch.float8_e4m3fn:
            bad = (x.view(torch.uint8) & 0x7F) == 0x7F
        elif t.dtype == torch.float8_e5m2:               # exponent all ones: inf or NaN
            bad = (x.view(torch.uint8) & 0x7C) == 0x7C
        else:
            bad = ~torch.isfinite(x)
        if bad.any():
            raise CheckpointError(f"{reader.file(key)}: tensor {key!r} holds NaN or infinite values")


def _kept(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` as it came from the reader where it can stay there (a contiguous view of the mapped
    shard, on the CPU), else a copy of our own."""
    if torch.device(device).type == "cpu" and t.is_contiguous():
        return t
    return own_copy(t, device, t.dtype)


FP8_MODES = ("dequant", "keep", "quantize")


def _quantize_in_bands(w: torch.Tensor, block: int, scale_fmt: str | None,
                       arena: HugeArena | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.weight_quant`` of ``w``, one band of whole block rows (~1M elements) at a time:
    blocks are quantized independently, so the result is the same, and the fp32 temporaries
    stay small. Whole-weight temporaries (4 bytes an element, several of them) freed between
    weights interleaved with the results kept leave the C heap fragmented: the process kept
    ~2x the bf16 weights resident after quantizing V2-Lite's experts. The e4m3 result is
    carved from ``arena`` (2 MB pages, arena.py) when given."""
    from dsv3lab.fp8 import scale_of_amax, weight_quant
    from dsv3lab.kernels import cpu_quant
    M, N = w.shape
    q = arena.empty((M, N), torch.float8_e4m3fn) if arena is not None else None
    if cpu_quant.enabled(w):
        # the same values from C, straight into the result: no temporaries, ~2x the bands' rate
        s = scale_of_amax(cpu_quant.block_amax(w, block), scale_fmt)
        return cpu_quant.quant_fp8(w, s, block, out=q), s
    rows = max(block, (1 << 20) // max(N, 1) // block * block)
    if rows >= M and q is None:
        return weight_quant(w, block, scale_fmt=scale_fmt)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn) if q is None else q
    s = torch.empty(math.ceil(M / block), math.ceil(N / block), dtype=torch.float32)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        q[r0:r1], s[r0 // block:math.ceil(r1 / block)] = weight_quant(w[r0:r1], block, scale_fmt=scale_fmt)
    return q, s


def _dequant_in_bands(q: torch.Tensor, s: torch.Tensor, block: int, dtype: torch.dtype,
                      offset: tuple[int, int]) -> torch.Tensor:
    """``fp8.weight_dequant(q, s, block, dtype, offset)`` into a fresh contiguous tensor (torch's
    allocator: aligned as ``own_copy`` makes it), one band of whole block rows (~1M elements) at
    a time: each block is scaled on its own, so the values are the same, and the fp32
    temporaries (the widened codes, the scale grid, the product: ~14 bytes an element) stay a
    few MB instead of ~320 MB for a 11264 x 2048 dense weight."""
    from dsv3lab.fp8 import weight_dequant
    M, N = q.shape
    ro, co = offset
    rows = max(block, (1 << 20) // max(N, 1) // block * block)
    if ro + M <= rows:
        return weight_dequant(q, s, block, dtype, offset=offset)
    out = torch.empty(M, N, dtype=dtype)
    start = 0
    while start < M:
        at = ro + start                                 # rows from the first scale block's start
        end = min(M, (at // rows + 1) * rows - ro)
        out[start:end] = weight_dequant(q[start:end], s[at // block:math.ceil((ro + end) / block)], block, dtype,
                                        offset=(at % block, co))
        start = end
    return out


def read_tensors(reads: list[TensorRead], reader: ShardReader, cfg: ModelConfig, device, fp8: str,
                 progress: bool = False, desc: str = "load") -> None:
    """Read every tensor of ``reads`` (only its window), put it in place.

    fp8="dequant": FP8 weights dequantized into the model's dtype, every tensor copied into
    memory of our own (64-byte aligned: a loaded model computes bit for bit as a built one).
    fp8="keep": Linear weights stored FP8 stay e4m3 with their scales; every tensor whose stored
    dtype is the one the model holds stays a view of the mapped shard (zero copy); the rest are
    converted copies. fp8="quantize": as "keep", and the Linear weights that the official
    checkpoints store in FP8 but this one stores in bf16/fp32 (V2-Lite, Moonlight) are
    quantized here into the same format (e4m3, 128x128 ``weight_scale_inv``, ``dsv3lab.fp8``)."""
    block = cfg.fp8_block_size or 128
    items = reads
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(reads, desc=desc, unit="tensor")
    as_stored = fp8 in ("keep", "quantize")
    kept = set()
    arena = HugeArena() if fp8 == "quantize" and (device is None or torch.device(device).type == "cpu") else None

    def release(*keys):            # read and copied: its pages of the mapping may go
        for k in keys:
            if k not in kept and k in reader.weight_map:
                reader.mapping(k).release(k)

    trimmed_at = reader.bytes_read

    for r in items:
        if reader.bytes_read - trimmed_at >= TRIM_EVERY:    # the temporaries' free chunks back to the system
            trim_heap()
            trimmed_at = reader.bytes_read
        rows, cols = r.window
        t = reader.get(r.key, rows=rows, cols=cols)
        check_finite(reader, r.key, t)
        lin = isinstance(r.module, Linear) and r.attr == "weight"
        if r.fp8:
            # the scale blocks covering this window: floor(start/b) .. ceil(stop/b)
            r0, c0 = (rows.start if rows else 0), (cols.start if cols else 0)
            r1, c1 = r0 + t.shape[0], c0 + t.shape[1]
            sk = r.key + "_scale_inv"
            s = reader.get(sk, rows=slice(r0 // block, math.ceil(r1 / block)),
                           cols=slice(c0 // block, math.ceil(c1 / block))).float()
            check_scales(reader, sk, s, cfg.scale_fmt, at=(r0 // block, c0 // block))
            if as_stored and lin:
                w = _kept(t, device)
                r.module.weight = nn.Parameter(w, requires_grad=False)
                r.module.weight_scale_inv = _kept(s, device)
                kept.update((r.key, sk))
                if w is not t:
                    release(r.key)
                continue
            t = _dequant_in_bands(t, s, block, r.dtype, offset=(r0 % block, c0 % block))
            release(r.key)
            if device is None or torch.device(device).type == "cpu":
                place(r.module, r.attr, t)           # already ours, contiguous and aligned: no second copy
                continue
        elif fp8 == "quantize" and lin and is_fp8_key(r.key):
            q, s = _quantize_in_bands(t, block, cfg.scale_fmt, arena)
            r.module.weight = nn.Parameter(q.to(device), requires_grad=False)
            r.module.weight_scale_inv = s.to(device)
            release(r.key)
            continue
        elif as_stored and t.dtype == r.dtype:
            w = _kept(t, device)
            place(r.module, r.attr, w)
            if w is t:
                kept.add(r.key)
            else:
                release(r.key)
            continue
        place(r.module, r.attr, own_copy(t, device, r.dtype))
        release(r.key)
    trim_heap()


TRIM_EVERY = 256 << 20     # bytes read (and made our own, or mapped) between two trims of the C heap


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, or not Linux)."""
    try:
        import ctypes
        fn = ctypes.CDLL(None).malloc_trim
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        return fn
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. A load that makes weights its own
    (quantizing a bf16 release, dequantizing) frees a temporary for every weight it keeps; glibc
    serves the next ones from its heap once a freed mapping has raised its mmap threshold, and
    the free chunks left between kept weights stay resident: quantizing a full-size
    DeepSeek-V2-Lite held ~23 GB of anonymous memory for 15.3 GB of weights, and the kernel
    killed it on a 23 GB machine. ``malloc_trim`` returns those pages (the loader calls it every
    ``TRIM_EVERY`` bytes it reads, and at the end); elsewhere this does nothing."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def rss_bytes() -> tuple[int, int]:
    """(resident, peak resident) bytes of this process; (0, 0) where the OS does not say.
    Linux: VmRSS and VmHWM of /proc/self/status (``ru_maxrss`` can carry a peak over from the
    process a child was forked from)."""
    try:
        with open("/proc/self/status") as f:
            v = {k: int(rest.split()[0]) * 1024 for k, _, rest in (line.partition(":") for line in f)
                 if k in ("VmRSS", "VmHWM")}
        return v["VmRSS"], v["VmHWM"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 0, peak * (1 if os.uname().sysname == "Darwin" else 1024)
    except (ImportError, AttributeError):
        return 0, 0


def memory_of(model: nn.Module, reader: ShardReader | None = None) -> dict[str, int]:
    """Bytes of the model's tensors that are views of ``reader``'s mapped shards (``mapped``: the
    page cache holds them) and bytes in memory of our own (``own``)."""
    maps = {m.bytes.untyped_storage().data_ptr() for m in (reader._maps.values() if reader else ())}
    out, seen = {"mapped": 0, "own": 0}, set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.is_meta or (t.data_ptr(), t.numel()) in seen:
            continue
        seen.add((t.data_ptr(), t.numel()))     # tied weights count once
        mapped = t.untyped_storage().data_ptr() in maps
        out["mapped" if mapped else "own"] += t.numel() * t.element_size()
    return out


def load_checkpoint(path: str, dtype: torch.dtype | None = None, device=None, fp8: str = "dequant",
                    attn_mode: str | None = None, progress: bool = False,
                    shard_model: Callable[[Transformer], None] | None = None,
                    check_reads: Callable[[list[TensorRead], ModelConfig], None] | None = None,
                    reader: ShardReader | None = None, max_memory: float | None = None,
                    prefetch: bool = True) -> Transformer:
    """The loader. ``shard_model`` turns the whole meta model into one rank's share (modules
    then carry ``shard``, the window of the full weight they hold; ``dsv3lab.parallel``);
    without it the model is whole: one process is the one-rank case. ``check_reads`` adds
    checks that only a ranked load has (FP8 kept across block-aligned splits)."""
    import time
    t0 = time.perf_counter()
    path = os.fspath(path)
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
    cfg = read_config(path)
    reader = reader or ShardReader(path)
    cfg, dtype = config_and_dtype(path, cfg, reader, dtype)
    model = Transformer(cfg, dtype, "meta")
    full_shapes = {hf_key(cfg, name): tuple(t.shape)
                   for name, t in list(model.named_parameters()) + list(model.named_buffers())
                   if not name.endswith("weight_scale_inv")}
    check_keys(path, cfg, set(reader.keys()), set(full_shapes))
    for key in {reader.weight_map[k]: k for k in sorted(reader.keys())}.values():
        reader.handle(key)     # open every shard (headers only): a damaged one is named even if unread
    if shard_model is not None:
        shard_model(model)
    reads = reads_for(path, cfg, reader, model, full_shapes)
    if check_reads is not None:
        check_reads(reads, cfg)
    paged = []
    if max_memory is not None:        # routed experts: checked above from the headers, read when routed to
        from dsv3lab.paging import ROUTED_RE
        if shard_model is not None or (device is not None and torch.device(device).type != "cpu"):
            raise ValueError("max_memory pages experts for one process on the CPU")
        paged = [r for r in reads if ROUTED_RE.match(r.name)]
        reads = [r for r in reads if not ROUTED_RE.match(r.name)]
    read_tensors(reads, reader, cfg, device or "cpu", fp8, progress,
                 desc=f"load {os.path.basename(path.rstrip('/'))}")
    if paged:
        from dsv3lab.paging import page_experts
        held = memory_of(model, reader)
        page_experts(model, reader, cfg, paged, fp8, int(max_memory * 1e9), held["mapped"] + held["own"],
                     prefetch=prefetch)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise CheckpointError(f"{path}: {len(left)} tensor(s) left unloaded, e.g. {left[:3]}")
    rss, peak = rss_bytes()
    model._dsv3_load = dict(path=path, fp8=fp8, bytes_read=reader.bytes_read, tensors_read=reader.tensors_read,
                            seconds=time.perf_counter() - t0, rss=rss, peak_rss=peak, **memory_of(model, reader))
    if progress:
        import sys
        print(load_summary(model._dsv3_load), file=sys.stderr)
    return model.set_attn_mode(attn_mode).eval()


def load_summary(stats: dict) -> str:
    """One line from ``model._dsv3_load``: time, bytes mapped and own, RSS now and at its peak."""
    def gb(n):
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
    return (f"loaded {stats['path']} (fp8={stats['fp8']}) in {stats['seconds']:.2f} s: "
            f"{gb(stats['mapped'])} mapped from the shards, {gb(stats['own'])} of our own; "
            f"RSS {gb(stats['rss'])}, peak {gb(stats['peak_rss'])}")


def load(path: str, dtype: torch.dtype | None = None, device=None, fp8: str = "dequant",
         attn_mode: str | None = None, progress: bool = False, max_memory: float | None = None,
         prefetch: bool = True) -> Transformer:
    """Load a checkpoint directory in the official HF layout (one process, the whole model;
    ``dsv3lab.parallel.load_sharded`` is the same loader for one rank of many).

    dtype: compute dtype for every non-fp32 tensor (default: the dtype stored for the embedding).
    fp8: "dequant" turns FP8 weights into ``dtype`` once here (CPU default); "keep" leaves them
    e4m3 with their ``weight_scale_inv``, memory-mapped from the shards (no copy), as is every
    tensor stored in the dtype the model holds; "quantize" is "keep" plus the bf16/fp32 weights
    the official releases store in FP8 quantized at load (V2-Lite, Moonlight: ~1 byte a weight).
    max_memory: GB (1e9 bytes) of weights to hold at most: the dense part is loaded as above and
    the routed experts are paged from the shards through an LRU of what is left, read when
    routed to and prefetched from predicted routing unless ``prefetch=False``
    (``dsv3lab.paging``; ``model.pager.stats()`` has the hit rate and bytes read).
    ``model._dsv3_load`` holds the load's seconds, RSS and peak RSS, bytes mapped and own;
    ``progress=True`` prints them.
    """
    from dsv3lab.family import load_other
    other = load_other(path, dtype, device, fp8=fp8, attn_mode=attn_mode, progress=progress,   # DeepSeek-V4,
                       max_memory=max_memory, prefetch=prefetch)    # fused experts (dsv3lab/family.py)
    if other is not None:
        return other
    return load_checkpoint(path, dtype=dtype, device=device, fp8=fp8, attn_mode=attn_mode, progress=progress,
                           max_memory=max_memory, prefetch=prefetch)
