"""Which page size the mapped shards are read through, and asking for 2 MB pages.

A decode token streams ~3 GB of mapped weights. With 4 KB pages that is one TLB miss, and one
restart of the CPU's stream prefetcher (it stops at a page's edge), every 4 KB; a 2 MB page
makes both 512 times rarer. Linux maps a file with 2 MB page table entries only where the page
cache holds the file in 2 MB folios (kernels with large-folio page caches, e.g. ext4 and XFS on
6.x). A fault in a mapping advised ``MADV_HUGEPAGE`` reads 2 MB folios when transparent huge
pages are in ``madvise`` mode (their usual default); other reads get what readahead picks
(llama.cpp's own load of its GGUF left 23-79 % of it in 2 MB pages on the machine below).

On a 2-core AVX2 EPYC, Moonlight-16B-A3B (FP8 kept) decoded at 3.5-4.9 tokens/s, process after
process, with 27 % of its mapped shards in 2 MB pages, and at 5.8-6.3 in three of four processes
with 97 % (docs/performance.md, "2 MB pages and a guided schedule"). Pages the cache already
holds in small folios stay small until they are read again: ``evict`` drops a file's clean,
unmapped pages, so the next load reads it from disk in large ones.
"""

from __future__ import annotations

import mmap
import os


def advise_huge_pages(mm: mmap.mmap) -> bool:
    """Ask for 2 MB pages on a mapping (before it is first read); False where the OS has no
    such advice (it is only advice: the mapping works either way)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(mm, "madvise"):
        return False
    try:
        mm.madvise(advice)
    except OSError:                      # a kernel built without transparent huge pages
        return False
    return True


def mapped_pages(files) -> dict[str, int] | None:
    """Bytes of this process's mappings of ``files`` that are resident (``resident``) and, of
    those, mapped by 2 MB page table entries (``huge``), from ``/proc/self/smaps``; None where
    the OS does not say (not Linux)."""
    wanted = {os.path.realpath(f) for f in files}
    out = {"resident": 0, "huge": 0}
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head, _, rest = line.partition(" ")
                if "-" in head and not head.endswith(":"):        # a mapping's first line
                    fields = rest.split(None, 4)
                    inside = len(fields) == 5 and os.path.realpath(fields[4].strip()) in wanted
                elif inside and head == "Rss:":
                    out["resident"] += int(rest.split()[0]) * 1024
                elif inside and head == "FilePmdMapped:":
                    out["huge"] += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out


def anonymous_pages() -> dict[str, int] | None:
    """Bytes of this process's anonymous memory that are resident (``resident``) and, of those, in
    2 MB pages (``huge``: transparent huge pages, e.g. ``arena.HugeArena``'s), from
    ``/proc/self/smaps_rollup``; None where the OS does not say."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            v = {k: int(rest.split()[0]) * 1024 for k, _, rest in (line.partition(":") for line in f)
                 if k in ("Anonymous", "AnonHugePages")}
        return {"resident": v["Anonymous"], "huge": v["AnonHugePages"]}
    except (OSError, KeyError, ValueError, IndexError):
        return None


def evict(files) -> None:
    """Drop each file's pages from the page cache where no process maps them (they are clean:
    the file is only read), so that the next load reads it from disk -- in 2 MB folios under
    ``advise_huge_pages``. Costs that read: the whole file, once."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_in_2mb_pages(files) -> None:
    """Read each file into the page cache afresh through a mapping advised 2 MB pages, so that
    any process mapping it next -- one that asks for nothing, as llama.cpp does -- is served 2 MB
    pages where the kernel can (the bench gives its peer the pages our loader asks for)."""
    evict(files)
    for file in files:
        with open(file, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                continue
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            advise_huge_pages(mm)
            for off in range(0, len(mm), 1 << 21):        # one fault a 2 MB folio
                mm[off]
        finally:
            mm.close()
