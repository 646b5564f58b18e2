"""Building the C kernels (``cpu/*.c``) for the CPU at hand, or for a lower ISA tier of it.

Each C library is one translation unit compiled on first use with the system's C compiler
(``-O3 -march=TIER -fopenmp -ffp-contract=fast``) into ``$DSV3LAB_CACHE`` (default
``~/.cache/dsv3lab``), once per source (headers included), compiler, flags and CPU, and written
atomically so that concurrent processes (pytest workers, torchrun ranks) can build it at the same
time. The vector code (``cpu/vec.h``) takes whatever the tier has: AVX-512 (16 lanes), AVX2 + FMA
(8), SSE or NEON (4); AVX512-BF16 and AMX paths where the tier has them.

The tier is ``DSV3LAB_CPU_MARCH`` (default ``native``: everything this CPU has). ``tiers()`` lists
those this CPU can run -- on x86-64 the psABI levels ``x86-64-v2`` (SSE4.2), ``x86-64-v3``
(AVX2, FMA, F16C) and ``x86-64-v4`` (AVX-512) it has the instructions for, then ``native`` -- so
that a developer on an AVX-512 machine can test the AVX2 code and the portable fallbacks
(``make test`` does: tests/test_cpu_tiers.py).

Without a C compiler, or if the build fails, ``build`` returns None (a warning says why, once)
and the engine runs its torch code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCES = Path(__file__).with_name("cpu")
BASE_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast"]

# the x86-64 psABI levels and the /proc/cpuinfo flags each needs (GCC's -march=x86-64-vN)
X86_LEVELS = {
    "x86-64-v2": ("sse4_2", "ssse3", "popcnt", "cx16"),
    "x86-64-v3": ("avx2", "fma", "f16c", "bmi2", "movbe"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is no such file): the one
    reader of it in the package."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                           # the first processor's block ends here
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (x86: ``flags``, Arm: ``Features``)."""
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


@functools.lru_cache(maxsize=None)
def llc_bytes() -> int | None:
    """The last-level cache's size in bytes (Linux sysfs: the highest cache level of cpu0), None
    where the system does not say."""
    best = (0, None)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((d / "level").read_text())
            size = (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        try:
            n = int(size.rstrip("KkMmGg")) * mult
        except ValueError:
            continue
        if level > best[0]:
            best = (level, n)
    return best[1]


def cpu_model() -> str:
    """The CPU's model name, for naming where a figure came from; the platform's processor string
    where /proc/cpuinfo has none (Arm has no ``model name``)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def isa_summary() -> str:
    """The vector features that matter to the kernels, e.g. 'avx2 fma f16c' or 'avx512f
    avx512_bf16 amx_bf16'."""
    keep = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")
    have = [f for f in keep if f in cpu_flags()]
    return " ".join(have) or platform.machine()


def tiers() -> list[str]:
    """The -march values this CPU runs, lowest first, ending with 'native'."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["native"]
    flags, out = cpu_flags(), []
    for level, need in X86_LEVELS.items():
        if not all(f in flags for f in need):
            break
        out.append(level)
    return out + ["native"]


def march() -> str:
    """The tier the libraries are built for: ``DSV3LAB_CPU_MARCH``, default 'native'."""
    m = os.environ.get("DSV3LAB_CPU_MARCH", "native").strip() or "native"
    if not all(ch.isalnum() or ch in "-_." for ch in m):
        raise ValueError(f"DSV3LAB_CPU_MARCH must be a -march value such as x86-64-v3 or native, got {m!r}")
    return m


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def flags(tier: str) -> list[str]:
    return [*BASE_FLAGS, f"-march={tier}"]


def cache_dir() -> Path:
    return Path(os.environ.get("DSV3LAB_CACHE") or Path.home() / ".cache" / "dsv3lab")


def library_path(source: Path, tier: str, cc: str) -> Path:
    """Where the library of ``source`` for ``tier`` lives: its name hashes the source and every
    header beside it (a changed header is a new library), the compiler, the flags and the CPU."""
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    ident = " ".join([cc, *flags(tier)]) + " ".join(sorted(cpu_flags()))
    key = hashlib.sha256(src + ident.encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{tier}-{key}.so"


def compile_to(source: Path, out: Path, tier: str, cc: str) -> str | None:
    """Compiles ``source`` into ``out`` (atomically); the compiler's error text, or None."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            r = subprocess.run([cc, *flags(tier), str(source), "-o", tmp, "-lm"], capture_output=True, text=True)
            err = r.stderr[-2000:] if r.returncode else None
        except OSError as e:
            err = str(e)
        if err is None:
            os.replace(tmp, out)
        return err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compile_library(source: Path, tier: str | None = None) -> ctypes.CDLL | None:
    """The shared library of one C source under ``cpu/`` for ``tier`` (default ``march()``),
    compiled once; None (with one warning naming the reason) when it cannot be built. Callers set
    the functions' ctypes signatures."""
    return _compile_library(source, tier or march())


def bound_library(source: Path, tier: str, signatures: dict) -> ctypes.CDLL | None:
    """``compile_library(source, tier)`` with its functions' ctypes signatures set: ``signatures``
    maps a function's name to its argument types (returning nothing) or to (argument types,
    result type). None when the library cannot be built."""
    lib = compile_library(source, tier)
    if lib is None:
        return None
    for name, sig in signatures.items():
        args, result = sig if isinstance(sig, tuple) else (sig, None)
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


@functools.lru_cache(maxsize=None)
def _compile_library(source: Path, tier: str) -> ctypes.CDLL | None:
    cc = compiler()
    if cc is None:
        warnings.warn(f"dsv3lab: no C compiler (gcc/cc) found for {source.name}; the torch code runs instead",
                      stacklevel=3)
        return None
    out = library_path(source, tier, cc)
    if not out.exists():
        err = compile_to(source, out, tier, cc)
        if err is not None:
            warnings.warn(f"dsv3lab: building {source.name} for -march={tier} with {cc} failed; the torch code "
                          f"runs instead:\n{err}", stacklevel=3)
            return None
    import torch  # noqa: F401  -- torch's OpenMP runtime must be loaded first (see cpu/decode_bf16.c)
    return ctypes.CDLL(str(out))
