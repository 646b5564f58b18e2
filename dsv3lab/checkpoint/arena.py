"""Memory in 2 MB pages for the weights a load makes its own (quantized at load).

torch's allocator takes large tensors from glibc, which maps them in 4 KB pages unless the
process was started with transparent huge pages for all memory (``THP_MEM_ALLOC_ENABLE``, read
once, before any tensor exists). A quantized V2-Lite holds ~15 GB that way: one TLB miss and one
stream-prefetcher restart per 4 KB of weights read (``pages.py`` measures the same on mapped
shards). ``HugeArena`` hands out tensors carved from large anonymous mappings advised
``MADV_HUGEPAGE`` before they are written, so the kernel backs them with 2 MB pages where it
can. A tensor keeps its mapping alive; a mapping is freed with the last tensor carved from it.
"""

from __future__ import annotations

import math
import mmap

import torch

from dsv3lab.checkpoint.pages import advise_huge_pages

CHUNK = 256 << 20        # bytes a mapping holds: large enough that its 2 MB pages are most of it
ALIGN = 4096             # each tensor starts on a page (the kernels need 64 bytes)


class HugeArena:
    """``empty(shape, dtype)``: an uninitialised contiguous CPU tensor in 2 MB-page memory."""

    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self._bytes: torch.Tensor | None = None     # the current mapping, as bytes
        self._used = 0

    def _map(self, n: int) -> torch.Tensor:
        size = -(-n // (2 << 20)) * (2 << 20)
        # private: a shared anonymous mapping is shmem, whose huge pages follow another switch
        # (shmem_enabled, usually "never"); untouched pages cost nothing until written
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        advise_huge_pages(mm)
        return torch.frombuffer(mm, dtype=torch.uint8)   # the tensor holds the mapping

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if n > self.chunk // 4:                       # a large weight: a mapping of its own
            return self._map(n)[:n].view(dtype).view(shape)
        start = -(-self._used // ALIGN) * ALIGN
        if self._bytes is None or start + n > self._bytes.numel():
            self._bytes, start = self._map(self.chunk), 0
        self._used = start + n
        return self._bytes[start:start + n].view(dtype).view(shape)
