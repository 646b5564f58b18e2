"""Page sizes of the mapped shards (``dsv3lab/checkpoint/pages.py``): the loader advises 2 MB pages
on every shard mapping, the accounting reads this process's own mappings, and ``evict`` drops a
file from the page cache. Linux only (elsewhere the functions say they cannot and these skip);
whether the kernel then uses 2 MB pages depends on its filesystem and THP settings, which a test
cannot choose, so the tests check the advice and the accounting, not the page size obtained."""

import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest
import torch

import dsv3lab
from dsv3lab.checkpoint.pages import advise_huge_pages, anonymous_pages, evict, mapped_pages
from lab_models import tiny_with_biases

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")


def _vm_flags(file: str | None = None, ptr: int | None = None) -> list[set[str]]:
    """The VmFlags of each of this process's mappings of ``file``, or of the one holding address ``ptr``."""
    out, inside = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):
                if ptr is not None:
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= ptr < hi
                else:
                    fields = rest.split(None, 4)
                    inside = len(fields) == 5 and os.path.realpath(fields[4].strip()) == os.path.realpath(file)
            elif inside and head == "VmFlags:":
                out.append(set(rest.split()))
    return out


def _thp_available() -> bool:
    return os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


@linux
def test_the_loader_advises_2mb_pages_on_every_shard(tmp_path):
    if not _thp_available():
        pytest.skip("kernel without transparent huge pages: MADV_HUGEPAGE is refused")
    d = Path(dsv3lab.save(tiny_with_biases(), tmp_path / "ck", fp8=True))
    model = dsv3lab.load(d, fp8="keep")
    shards = sorted(str(p) for p in d.glob("*.safetensors"))
    assert shards
    for shard in shards:
        flags = _vm_flags(shard)
        assert flags, f"{shard} is not mapped"
        assert all("hg" in f for f in flags), (shard, flags)       # hg: VM_HUGEPAGE
    del model


@linux
def test_mapped_pages_counts_this_process_mapping_of_the_file(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(3 << 20))
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 4096)
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    assert mapped_pages([f])["resident"] == 0               # mapped, nothing read yet
    t = torch.frombuffer(mm, dtype=torch.uint8)
    int(t[::4096].sum())                                     # read every 4 KB page
    pages = mapped_pages([f])
    assert 3 << 20 <= pages["resident"] <= (3 << 20) + (2 << 20), pages
    assert 0 <= pages["huge"] <= pages["resident"]
    assert mapped_pages([other]) == {"resident": 0, "huge": 0}
    del t
    mm.close()
    assert mapped_pages([f]) == {"resident": 0, "huge": 0}


@linux
def test_advice_leaves_the_bytes_as_they_are(tmp_path):
    data = os.urandom(5 << 20)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    assert advise_huge_pages(mm) == _thp_available()
    assert mm[:] == data
    mm.close()


def _resident_pages(file) -> int:
    """Pages of ``file`` in the page cache: mincore over a fresh mapping that nothing has read."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(file)
    with open(file, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    view = (ctypes.c_char * size).from_buffer(mm)
    rc = libc.mincore(ctypes.addressof(view), size, vec)
    del view
    mm.close()
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


def _on_tmpfs(path) -> bool:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, fstype
    return kind in ("tmpfs", "ramfs")


@linux
def test_evict_drops_the_file_from_the_page_cache(tmp_path):
    if _on_tmpfs(tmp_path):
        pytest.skip("the temporary directory is in memory (tmpfs): its pages cannot be dropped")
    data = os.urandom(4 << 20)
    f = tmp_path / "w.bin"
    with open(f, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())                # dirty pages are not dropped; written back ones are
    assert f.read_bytes() == data
    before = _resident_pages(f)
    assert before > 0
    evict([f])
    assert _resident_pages(f) < before
    assert f.read_bytes() == data            # read again from disk


def test_arena_tensors_are_disjoint_aligned_and_outlive_the_arena():
    from dsv3lab.checkpoint.arena import ALIGN, HugeArena
    arena = HugeArena(chunk=8 << 20)
    shapes = [(128, 200), (3, 5), (1 << 20,), (1408, 2048), (0, 7), (64, 64)]
    ts = [arena.empty(s, torch.float8_e4m3fn if i % 2 else torch.float32) for i, s in enumerate(shapes)]
    for t, s in zip(ts, shapes):
        assert tuple(t.shape) == s and t.is_contiguous()
        assert t.data_ptr() % ALIGN == 0 or t.numel() == 0
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in ts if t.numel())
    assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:])), spans
    for i, t in enumerate(ts):                         # each keeps its own values
        t.view(torch.uint8).fill_(i + 1)
    del arena
    import gc
    gc.collect()
    for i, t in enumerate(ts):
        assert t.numel() == 0 or bool((t.view(torch.uint8) == i + 1).all())


@linux
def test_quantize_at_load_puts_the_weights_in_memory_advised_2mb_pages(tmp_path):
    if not _thp_available():
        pytest.skip("kernel without transparent huge pages: MADV_HUGEPAGE is refused")
    from dsv3lab.checkpoint import hf_key
    from dsv3lab.fp8 import weight_quant
    m = tiny_with_biases()
    d = Path(dsv3lab.save(m, tmp_path / "bf16"))        # bf16/fp32 weights, as V2-Lite ships
    model = dsv3lab.load(d, fp8="quantize")
    from safetensors.torch import load_file
    stored = {}
    for shard in d.glob("*.safetensors"):
        stored.update(load_file(shard))
    lins = [(n, mod) for n, mod in model.named_modules() if getattr(mod, "weight", None) is not None
            and mod.weight.dtype == torch.float8_e4m3fn]
    assert lins
    for name, mod in lins:
        assert ["hg" in f for f in _vm_flags(ptr=mod.weight.data_ptr())] == [True], name
        q, s = weight_quant(stored[hf_key(model.cfg, name + ".weight")], 128, scale_fmt=model.cfg.scale_fmt)
        assert torch.equal(mod.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(mod.weight_scale_inv, s), name


@linux
def test_anonymous_pages_counts_memory_this_process_writes():
    before = anonymous_pages()
    block = torch.ones(64 << 20, dtype=torch.uint8)          # 64 MB written: resident, anonymous
    after = anonymous_pages()
    assert after["resident"] - before["resident"] >= 60 << 20, (before, after)
    assert 0 <= after["huge"] <= after["resident"]
    del block
