"""Reading a checkpoint directory: its index, each shard opened once and memory-mapped once.

``ShardReader`` answers from the index and the file headers (keys, shapes, stored dtypes) without
reading a tensor, and reads a tensor -- or only a row/column window of it -- as a view of the
shard's mapping (``ShardMap``). Every failure is a ``CheckpointError`` naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import os

import torch

from dsv3lab.checkpoint.pages import advise_huge_pages
from dsv3lab.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, extra, misshapen or unreadable."""


def read_config(path: str) -> ModelConfig:
    """The ``config.json`` of a checkpoint directory (``ConfigError`` names a bad field)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return ModelConfig.from_hf(path)


def read_index(path: str) -> dict[str, str]:
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
        for k in open_shard(os.path.join(path, fn)).keys():
            out[k] = fn
    return out


def open_shard(file: str):
    from safetensors import safe_open
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers / truncation
        raise CheckpointError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64}
if hasattr(torch, "float8_e8m0fnu"):     # ue8m0 scales may be stored as bare exponents
    _ST_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class ShardReader:
    """Lazy reads from a sharded checkpoint; each file opened once by safetensors (which checks
    its header) and memory-mapped once (``ShardMap``: tensors are views, not copies). Counts what
    ``get`` returned (``bytes_read``, ``tensors_read``): what this process read."""

    def __init__(self, path: str):
        self.path = path
        self.weight_map = read_index(path)
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
            self._handles[fn] = open_shard(os.path.join(self.path, fn))
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
        advise_huge_pages(self.mmap)         # before the first read: pages.py says why
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
