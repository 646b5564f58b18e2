"""The C kernels on every ISA tier this CPU can run, and the sources on other architectures.

The rest of the suite runs the kernels built for this CPU (``-march=native``). A CPU with AVX-512
then never runs the AVX2 code and an AVX2 one never runs the SSE fallback, though users' CPUs
will. So each lower tier this CPU has (kernels/cpu_compile.py: ``x86-64-v2`` (SSE4.2), ``x86-64-v3``
(AVX2 + FMA), ``x86-64-v4`` (AVX-512) where present) runs the kernel and fused-step tests again in
a child pytest with ``DSV3LAB_CPU_MARCH`` set to it, and oneDNN capped to the same instructions
(``ONEDNN_MAX_CPU_ISA``), so that the torch side of every comparison runs the code such a CPU
would run too. ``native`` is the main run's.

Where Debian's aarch64 cross compiler is installed (``gcc-aarch64-linux-gnu``), the C sources are
compiled for aarch64 (NEON through vec.h), so the portable code stays portable.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3lab.kernels import cpu_compile

ROOT = Path(__file__).resolve().parents[1]
TIER_TESTS = ["tests/test_cpu_decode.py", "tests/test_sparse_kernels.py", "tests/test_cpu_bf16.py"]
# oneDNN's cap for the instructions of each tier (its names: ONEDNN_MAX_CPU_ISA)
ONEDNN_ISA = {"x86-64-v2": "SSE41", "x86-64-v3": "AVX2", "x86-64-v4": "AVX512_CORE"}
LOWER_TIERS = [t for t in cpu_compile.X86_LEVELS]


@pytest.mark.slow
@pytest.mark.parametrize("tier", LOWER_TIERS)
def test_kernel_and_fused_step_tests_pass_on_a_lower_tier(tier, tmp_path):
    if tier not in cpu_compile.tiers():
        pytest.skip(f"this CPU ({cpu_compile.isa_summary()}) cannot run -march={tier} code")
    if cpu_compile.compiler() is None:
        pytest.skip("no C compiler: the kernels are never built here")
    env = dict(os.environ, DSV3LAB_CPU_MARCH=tier, ONEDNN_MAX_CPU_ISA=ONEDNN_ISA[tier], OMP_NUM_THREADS="1",
               DSV3LAB_CPU_KERNELS="all", TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider",
                          *TIER_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, f"-march={tier}:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
    assert " passed" in out.stdout.splitlines()[-1]


def test_the_child_runs_build_for_the_tier_they_name(monkeypatch):
    """DSV3LAB_CPU_MARCH reaches the compiler, and another tier is another library."""
    if cpu_compile.compiler() is None:
        pytest.skip("no C compiler")
    from dsv3lab.kernels import cpu_decode
    names = set()
    for tier in cpu_compile.tiers():
        monkeypatch.setenv("DSV3LAB_CPU_MARCH", tier)
        assert cpu_compile.march() == tier
        assert f"-march={tier}" in cpu_compile.flags(tier)
        names.add(cpu_compile.library_path(cpu_decode.SOURCE, tier, cpu_compile.compiler()).name)
        assert cpu_decode.library() is not None, tier
    assert len(names) == len(cpu_compile.tiers())


CROSS = shutil.which("aarch64-linux-gnu-gcc")


@pytest.mark.skipif(CROSS is None, reason="no aarch64 cross compiler (Debian: apt-get install gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", ["decode_bf16.c", "sparse_bf16.c"])
def test_c_sources_compile_for_aarch64(source, tmp_path):
    src = cpu_compile.SOURCES / source
    out = subprocess.run([CROSS, *cpu_compile.BASE_FLAGS, "-march=armv8.2-a", "-Wall", "-Werror", str(src),
                          "-o", str(tmp_path / "lib.so"), "-lm"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
