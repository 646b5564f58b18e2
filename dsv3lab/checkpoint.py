"""Checkpoints in the official Hugging Face layout, and building models from configs.

A checkpoint directory holds ``config.json``, ``model.safetensors.index.json`` and shards
``model-0000i-of-0000N.safetensors`` (or one ``model.safetensors``), keyed as DeepSeek-V3 ships:

  model.embed_tokens.weight, model.norm.weight, lm_head.weight
  model.layers.L.{input_layernorm, post_attention_layernorm}.weight
  model.layers.L.self_attn.{q_a_proj|q_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
                            kv_a_layernorm, kv_b_proj, o_proj}.weight
  model.layers.L.self_attn.indexer.{wq_b, wk, weights_proj}.weight, indexer.k_norm.{weight,bias}
                                                                          (V3.2's DSA indexer)
  model.layers.L.mlp.{gate,up,down}_proj.weight                           (dense layers)
  model.layers.L.mlp.gate.weight, model.layers.L.mlp.gate.e_score_correction_bias
  model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight, mlp.shared_experts.{...}.weight
  model.layers.{n+k}.{enorm, hnorm, eh_proj, shared_head.norm, shared_head.head, embed_tokens}
                                                                          (MTP depth k, n = layers)
FP8 weights (attention and indexer projections, dense and expert FFNs) are e4m3 with a
``.weight_scale_inv`` fp32 tensor per 128x128 block (powers of two under ``scale_fmt="ue8m0"``).
The one adapter between these keys and module names is ``hf_key``/``module_key`` below.

Loading is one loop for one process and for one rank of many (docs/checkpoints.md):
  plan   build the model on the meta device (``dsv3lab.parallel`` first turns it into one rank's
         share: each split module says which window of the full weight it holds);
  check  from the index and the file headers alone, before any tensor is read: missing,
         unexpected and orphaned tensors (whole model, every rank alike), then each needed
         tensor's shape and FP8 scale grid;
  read   each tensor's window only, a view of the shard's memory mapping (``ShardMap``), then by
         ``fp8``: "dequant" dequantizes (``dsv3lab.fp8.weight_dequant``) and copies every tensor
         into memory of our own; "keep" leaves FP8 weights and every tensor already in the model's
         dtype as views of the mapping (zero copy); "quantize" also turns bf16 weights the releases
         store in FP8 into e4m3 + scales.
``load`` is the one-rank case; ``dsv3lab.parallel.load_sharded`` is the ranked entry. With
``max_memory`` the routed experts are not read here but paged from the shards (``dsv3lab.paging``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from dsv3lab.config import ModelConfig
from dsv3lab.model.layers import Linear
from dsv3lab.model.transformer import Transformer


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, extra, misshapen or unreadable."""


_FP8_RE = re.compile(r"\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"
                     r"|indexer\.wq_b|indexer\.wk)\.weight$"
                     r"|\.mlp\.((experts\.\d+|shared_experts)\.)?(gate|up|down)_proj\.weight$")
# kept in fp32 whatever the model's dtype: the router (its logits pick experts) and the indexer's
# head weights (transformers keeps ``indexer.weights_proj`` in fp32 as well)
_FP32_RE = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$|\.indexer\.weights_proj\.weight$")
_MTP_COPY = ("embed_tokens.weight", "shared_head.head.weight")


def is_fp8_key(hf_key: str) -> bool:
    """Whether the official checkpoint stores this tensor in FP8: attention and indexer
    projections (wq_b, wk), dense, shared and routed expert FFNs. MTP's eh_proj, the gate, the
    indexer's weights_proj and k_norm, norms, embeddings and the head stay BF16/FP32."""
    return bool(_FP8_RE.search(hf_key))


def is_fp32_key(hf_key: str) -> bool:
    """Whether this tensor stays fp32 in a BF16/FP8 checkpoint (gate weight and bias, weights_proj)."""
    return bool(_FP32_RE.search(hf_key))


def hf_key(cfg: ModelConfig, name: str) -> str:
    """Module state-dict name -> checkpoint key."""
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(k)}.{rest}"
    if name.startswith("lm_head."):
        return name
    return "model." + name


def module_key(cfg: ModelConfig, key: str) -> Optional[str]:
    """Checkpoint key -> module name; None for the MTP copies of the embedding and head."""
    if key.startswith("lm_head."):
        return key
    if not key.startswith("model."):
        return "?" + key
    name = key[6:]
    m = re.match(r"layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        k = int(m.group(1)) - cfg.num_hidden_layers
        if m.group(2) in _MTP_COPY:
            return None
        return f"mtp.{k}.{m.group(2)}"
    return name


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------

def _default_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def build(cfg: ModelConfig | str, device="cpu", dtype: torch.dtype | None = None, seed: int = 0,
          attn_mode: str | None = None) -> Transformer:
    """A freshly initialised model (N(0, initializer_range) weights, unit norms, zero bias).
    ``device="meta"`` allocates nothing: the 671B preset builds in seconds for counting."""
    from dsv3lab.family import build_other
    other = build_other(cfg, device, dtype, seed)        # DeepSeek-V4 (dsv3lab/family.py)
    if other is not None:
        return other
    if isinstance(cfg, str):
        cfg = ModelConfig.preset(cfg)
    dtype = dtype or _default_dtype(device)
    if torch.device(device).type == "meta":
        return Transformer(cfg, dtype, "meta").set_attn_mode(attn_mode)
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, dtype, "meta")
    model.to_empty(device="cpu")
    std = cfg.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("norm.bias"):         # LayerNorm bias (the indexer's k_norm)
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        for name, b in model.named_buffers():
            b.zero_()
    model.to(device)
    return model.set_attn_mode(attn_mode).eval()


# --------------------------------------------------------------------------------------------
# load: one plan / check / read loop; one process is the one-rank case
# --------------------------------------------------------------------------------------------

def _index(path: str) -> dict[str, str]:
    """checkpoint key -> shard file name."""
    idx = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(idx):
        try:
            with open(idx) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{idx}: not a safetensors index ({type(e).__name__}: {e})") from None
        for fn in sorted(set(weight_map.values())):
            if os.path.basename(fn) != fn or not os.path.isfile(os.path.join(path, fn)):
                raise CheckpointError(f"{idx} lists {fn}, which is not in {path}")
        return weight_map
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
    out = {}
    for fn in files:
        for k in _open(os.path.join(path, fn)).keys():
            out[k] = fn
    return out


def _open(file: str):
    from safetensors import safe_open
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers / truncation
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64}
if hasattr(torch, "float8_e8m0fnu"):     # ue8m0 scales may be stored as bare exponents
    _ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class ShardReader:
    """Lazy reads from a sharded checkpoint; each file opened once by safetensors (which checks
    its header) and memory-mapped once (``ShardMap``: tensors are views, not copies). Counts what
    ``get`` returned (``bytes_read``, ``tensors_read``): what this process read."""

    def __init__(self, path: str):
        self.path = path
        self.weight_map = _index(path)
        self._handles = {}
        self._maps: dict[str, ShardMap] = {}
        self.bytes_read = 0
        self.tensors_read = 0

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def file(self, key: str) -> str:
        return os.path.join(self.path, self.weight_map[key])

    def handle(self, key: str):
        fn = self.weight_map[key]
        if fn not in self._handles:
            self._handles[fn] = _open(os.path.join(self.path, fn))
        return self._handles[fn], fn

    def _slice(self, key: str):
        h, fn = self.handle(key)
        try:
            return h.get_slice(key)
        except Exception as e:    # the index names a tensor its file does not hold
            raise CheckpointError(f"{os.path.join(self.path, fn)}: no tensor {key!r} although the index "
                                  f"lists it there ({type(e).__name__}: {e})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype, from the header (nothing is read)."""
        name = self._slice(key).get_dtype()
        if name not in _ST_DTYPES:
            raise CheckpointError(f"{self.file(key)}: tensor {key!r} has unsupported dtype {name}")
        return _ST_DTYPES[name]

    def mapping(self, key: str) -> "ShardMap":
        """The memory mapping of ``key``'s shard (made on first use, one per shard)."""
        h, fn = self.handle(key)          # safetensors has validated the header by now
        if fn not in self._maps:
            self._maps[fn] = ShardMap(os.path.join(self.path, fn))
        return self._maps[fn]

    def get(self, key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or only a row/column slice of it: a view into the shard's memory mapping
        (nothing is copied; a page is read from disk when first touched), or a copy from
        safetensors where the data does not sit at a multiple of its element size."""
        h, fn = self.handle(key)
        self._slice(key)                  # the index names a tensor its file does not hold
        t = self.mapping(key).tensor(key, self.dtype(key))
        try:
            if t is None:
                if rows is None and cols is None:
                    t = h.get_tensor(key)
                else:
                    sl = h.get_slice(key)
                    t = sl[rows or slice(None)] if len(sl.get_shape()) == 1 else \
                        sl[rows or slice(None), cols or slice(None)]
            elif rows is not None or cols is not None:
                t = t[rows or slice(None)] if t.dim() == 1 else t[rows or slice(None), cols or slice(None)]
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fn)}: cannot read tensor {key!r} "
                                  f"({type(e).__name__}: {e}); the file may be truncated") from None
        self.bytes_read += t.numel() * t.element_size()
        self.tensors_read += 1
        return t


class ShardMap:
    """One safetensors file memory-mapped copy-on-write: tensors are views of the mapping, so
    a weight kept as stored costs no memory of our own (the page cache holds it, and the OS
    may drop its pages and read them again). Writing to such a tensor changes this process's
    copy of the page, never the file. The header is read only after safetensors has validated
    it (``ShardReader.handle``). Like every mmap, the file must not be truncated in place while
    a model uses it (replacing it, as ``save`` does, is safe)."""

    def __init__(self, file: str):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(n))
            self.data_start = 8 + n
            self.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.file = file
        self.bytes = torch.frombuffer(self.mmap, dtype=torch.uint8)

    def span(self, key: str) -> tuple[int, int]:
        """(file offset, byte length) of a tensor's data."""
        b, e = self.header[key]["data_offsets"]
        return self.data_start + b, e - b

    def release(self, key: str) -> None:
        """Drop the pages that lie wholly inside ``key``'s data from this process (they were
        read and copied; the file is untouched, a later read maps them again). Without this a
        converted or dequantized weight would stay resident twice: as the copy and as pages of
        the mapping, which the OS counts in the process's RSS until it needs the memory."""
        if not hasattr(self.mmap, "madvise"):
            return
        off, n = self.span(key)
        page = mmap.PAGESIZE
        start, stop = -(-off // page) * page, (off + n) // page * page
        if stop > start:
            self.mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The tensor as a view of the mapping; None where its offset is not a multiple of its
        element size (the format does not promise alignment; such a tensor is copied)."""
        off, n = self.span(key)
        size = torch.empty((), dtype=dtype).element_size()
        if off % size:
            return None
        return self.bytes[off:off + n].view(dtype).view(self.header[key]["shape"])


def read_config(path: str) -> ModelConfig:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return ModelConfig.from_hf(path)


def resolve(path: str, cfg: ModelConfig, reader: ShardReader, dtype):
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


def _own(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
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
    """One tensor of the plan: where it comes from and where it goes."""
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


def plan_reads(path: str, cfg: ModelConfig, reader: ShardReader, model: Transformer,
               full_shapes: dict[str, tuple[int, ...]]) -> list[TensorRead]:
    """Every tensor ``model`` (a meta model, possibly one rank's share) needs, checked against
    the file headers before any tensor is read: shape against the whole model's, FP8 scale
    present and of the right block grid. In checkpoint-key order, so errors come out the same
    whichever rank or entry point meets them first."""
    from dsv3lab.fp8 import check_scale_shape
    keys = set(reader.keys())
    block = cfg.fp8_block_size or 128
    plan = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("weight_scale_inv"):
            continue
        key = hf_key(cfg, name)
        mod_name, attr = name.rsplit(".", 1)
        mod = model.get_submodule(mod_name)
        shard = getattr(mod, "shard", None) if attr == "weight" else None
        plan.append(TensorRead(key, name, mod, attr, t.dtype, shard, False, full_shapes[key]))
    plan.sort(key=lambda r: r.key)
    for r in plan:
        got = reader.shape(r.key)
        if got != r.full_shape:
            raise CheckpointError(f"{reader.file(r.key)}: tensor {r.key!r} has shape {list(got)}, "
                                  f"the config needs {list(r.full_shape)}")
        r.fp8 = reader.dtype(r.key) in _FP8
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
    return plan


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
    return _own(t, device, t.dtype)


FP8_MODES = ("dequant", "keep", "quantize")


def _quantize_in_bands(w: torch.Tensor, block: int, scale_fmt: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.weight_quant`` of ``w``, one band of whole block rows (~1M elements) at a time:
    blocks are quantized independently, so the result is the same, and the fp32 temporaries
    stay small. Whole-weight temporaries (4 bytes an element, several of them) freed between
    weights interleaved with the results kept leave the C heap fragmented: the process kept
    ~2x the bf16 weights resident after quantizing V2-Lite's experts."""
    from dsv3lab.fp8 import weight_quant
    M, N = w.shape
    rows = max(block, (1 << 20) // max(N, 1) // block * block)
    if rows >= M:
        return weight_quant(w, block, scale_fmt=scale_fmt)
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(M / block), math.ceil(N / block), dtype=torch.float32)
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        q[r0:r1], s[r0 // block:math.ceil(r1 / block)] = weight_quant(w[r0:r1], block, scale_fmt=scale_fmt)
    return q, s


def read_planned(plan: list[TensorRead], reader: ShardReader, cfg: ModelConfig, device, fp8: str,
                 progress: bool = False, desc: str = "load") -> None:
    """Read every planned tensor (only its window), put it in place.

    fp8="dequant": FP8 weights dequantized into the model's dtype, every tensor copied into
    memory of our own (64-byte aligned: a loaded model computes bit for bit as a built one).
    fp8="keep": Linear weights stored FP8 stay e4m3 with their scales; every tensor whose stored
    dtype is the one the model holds stays a view of the mapped shard (zero copy); the rest are
    converted copies. fp8="quantize": as "keep", and the Linear weights that the official
    checkpoints store in FP8 but this one stores in bf16/fp32 (V2-Lite, Moonlight) are
    quantized here into the same format (e4m3, 128x128 ``weight_scale_inv``, ``dsv3lab.fp8``)."""
    from dsv3lab.fp8 import weight_dequant
    block = cfg.fp8_block_size or 128
    items = plan
    if progress:
        from tqdm.auto import tqdm
        items = tqdm(plan, desc=desc, unit="tensor")
    as_stored = fp8 in ("keep", "quantize")
    kept = set()

    def release(*keys):            # read and copied: its pages of the mapping may go
        for k in keys:
            if k not in kept and k in reader.weight_map:
                reader.mapping(k).release(k)

    for r in items:
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
            t = weight_dequant(t, s, block, r.dtype, offset=(r0 % block, c0 % block))
            release(r.key)
        elif fp8 == "quantize" and lin and is_fp8_key(r.key):
            q, s = _quantize_in_bands(t, block, cfg.scale_fmt)
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
        place(r.module, r.attr, _own(t, device, r.dtype))
        release(r.key)


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
                    check_plan: Callable[[list[TensorRead], ModelConfig], None] | None = None,
                    reader: ShardReader | None = None, max_memory: float | None = None,
                    prefetch: bool = True) -> Transformer:
    """The loader. ``shard_model`` turns the whole meta model into one rank's share (modules
    then carry ``shard``, the window of the full weight they hold; ``dsv3lab.parallel``);
    without it the model is whole: one process is the one-rank case. ``check_plan`` adds
    checks that only a ranked load has (FP8 kept across block-aligned splits)."""
    import time
    t0 = time.perf_counter()
    path = os.fspath(path)
    if fp8 not in FP8_MODES:
        raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
    cfg = read_config(path)
    reader = reader or ShardReader(path)
    cfg, dtype = resolve(path, cfg, reader, dtype)
    model = Transformer(cfg, dtype, "meta")
    full_shapes = {hf_key(cfg, name): tuple(t.shape)
                   for name, t in list(model.named_parameters()) + list(model.named_buffers())
                   if not name.endswith("weight_scale_inv")}
    check_keys(path, cfg, set(reader.keys()), set(full_shapes))
    for key in {reader.weight_map[k]: k for k in sorted(reader.keys())}.values():
        reader.handle(key)     # open every shard (headers only): a damaged one is named even if unread
    if shard_model is not None:
        shard_model(model)
    plan = plan_reads(path, cfg, reader, model, full_shapes)
    if check_plan is not None:
        check_plan(plan, cfg)
    paged = []
    if max_memory is not None:        # routed experts: checked above from the headers, read when routed to
        from dsv3lab.paging import ROUTED_RE
        if shard_model is not None or (device is not None and torch.device(device).type != "cpu"):
            raise ValueError("max_memory pages experts for one process on the CPU")
        paged = [r for r in plan if ROUTED_RE.match(r.name)]
        plan = [r for r in plan if not ROUTED_RE.match(r.name)]
    read_planned(plan, reader, cfg, device or "cpu", fp8, progress,
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
    other = load_other(path, dtype, device)              # DeepSeek-V4 and the refused types (dsv3lab/family.py)
    if other is not None:
        return other
    return load_checkpoint(path, dtype=dtype, device=device, fp8=fp8, attn_mode=attn_mode, progress=progress,
                           max_memory=max_memory, prefetch=prefetch)


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------

def _tensors_to_save(model: Transformer, fp8: bool) -> Iterable[tuple[str, Callable[[], torch.Tensor], int]]:
    """(checkpoint key, thunk producing the tensor, bytes) in a stable order."""
    cfg = model.cfg
    bs = cfg.fp8_block_size or 128
    sd = model.state_dict()
    out = []
    for name, t in sd.items():
        if name.endswith(".weight_scale_inv"):
            continue
        key = hf_key(cfg, name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = sd[name + "_scale_inv"]
            out.append((key, (lambda t=t: t), t.numel()))
            out.append((key + "_scale_inv", (lambda s=s: s.float()), s.numel() * 4))
        elif fp8 and is_fp8_key(key):
            from dsv3lab.fp8 import weight_quant
            q_s = {}

            def q(t=t, q_s=q_s):
                if "q" not in q_s:
                    q_s["q"], q_s["s"] = weight_quant(t, bs, scale_fmt=cfg.scale_fmt)
                return q_s["q"]

            def s(t=t, q_s=q_s):
                q(t, q_s)
                return q_s.pop("s")

            out.append((key, q, t.numel()))
            out.append((key + "_scale_inv", s, math.ceil(t.shape[0] / bs) * math.ceil(t.shape[1] / bs) * 4))
        else:
            dt = torch.bfloat16 if fp8 and t.dtype == torch.float32 and not is_fp32_key(key) else t.dtype
            out.append((key, (lambda t=t, dt=dt: t.to(dt)), t.numel() * torch.tensor([], dtype=dt).element_size()))
    n = cfg.num_hidden_layers
    for k in range(len(model.mtp)):
        for suffix, src in zip(_MTP_COPY, (model.embed_tokens.weight, model.lm_head.weight)):
            dt = torch.bfloat16 if fp8 and src.dtype == torch.float32 else src.dtype
            out.append((f"model.layers.{n + k}.{suffix}", (lambda src=src, dt=dt: src.detach().to(dt).clone()),
                        src.numel() * src.element_size()))
    return out


def save(model: Transformer, path: str, fp8: bool = False, max_shard_bytes: int = 4 << 30,
         progress: bool = False, extra_files: dict[str, str] | None = None) -> str:
    """Write ``model`` to ``path`` in the official layout, atomically: everything goes to a
    temporary directory beside ``path`` which then replaces it, so an interrupted save leaves the
    previous checkpoint intact. Files in an existing ``path`` that are not checkpoint files
    (tokenizer.json, logs) are carried over. ``fp8=True`` stores the FP8-eligible weights as e4m3
    with 128x128 ``weight_scale_inv`` (the released format) and the rest in BF16/FP32."""
    from safetensors.torch import save_file
    path = os.path.abspath(os.fspath(path))
    if any(p.is_meta for p in model.parameters()):
        raise CheckpointError("cannot save a model on the meta device (it has no weights)")
    cfg = model.cfg
    entries = _tensors_to_save(model, fp8)
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + e[2] > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e[2]
    if cur:
        shards.append(cur)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        weight_map, total = {}, 0
        it = enumerate(shards)
        if progress:
            from tqdm.auto import tqdm
            it = tqdm(it, total=len(shards), desc=f"save {os.path.basename(path)}", unit="shard")
        for i, shard in it:
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key, thunk, nbytes in shard:
                tensors[key] = thunk().contiguous().cpu()
                weight_map[key] = fn
                total += tensors[key].numel() * tensors[key].element_size()
            save_file(tensors, os.path.join(tmp, fn), metadata={"format": "pt"})
            del tensors
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        hf = cfg.replace(fp8_block_size=cfg.fp8_block_size or 128).to_hf() if fp8 else \
            cfg.replace(fp8_block_size=None).to_hf()
        if any(p.dtype == torch.float8_e4m3fn for p in model.parameters()):
            hf = cfg.replace(fp8_block_size=cfg.fp8_block_size or 128).to_hf()
        hf["torch_dtype"] = "bfloat16" if fp8 else str(model.dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        if os.path.isdir(path):
            for fn in os.listdir(path):
                if fn.endswith(".safetensors") or fn in ("model.safetensors.index.json", "config.json") \
                        or os.path.exists(os.path.join(tmp, fn)):
                    continue
                src = os.path.join(path, fn)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, fn))
        # mkdtemp makes the directory 0700 (and safetensors writes 0600): give the finished
        # checkpoint ordinary permissions under the user's umask before it becomes visible
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for fn in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, fn)):
                os.chmod(os.path.join(tmp, fn), 0o666 & ~umask)
        if not os.path.exists(path):
            os.rename(tmp, path)
        else:
            _exchange_dirs(tmp, path)          # now tmp holds the previous checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _exchange_dirs(a: str, b: str) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE), so that at every
    instant ``b`` is a complete checkpoint, the old one or the new one. Where the call is
    missing (another OS, an old libc, a file system without it) fall back to two renames, with
    an instant in between at which ``b`` does not exist (the old one then sits beside it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
    backup = tempfile.mkdtemp(prefix=os.path.basename(b) + ".old-", dir=os.path.dirname(b))
    os.rmdir(backup)
    os.rename(b, backup)
    os.rename(a, b)
    os.rename(backup, a)
