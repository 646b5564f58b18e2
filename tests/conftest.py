"""Test setup. TRITON_INTERPRET must be set before anything imports triton (it is read at import).

The ``numerics`` marker: tests whose arithmetic can depend on the CPU bf16 policy
(``DSV3LAB_CPU_BF16=native|upcast``, dsv3lab/model/layers.py). ``make test`` runs the whole suite
under this machine's policy, then the ``numerics`` tests again under the other one, so a
regression on CPUs with bf16 units shows on machines without them and the other way round. A
module joins by being listed in NUMERICS_MODULES (or by marking tests itself).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# every C kernel on every CPU, whatever it measured against torch there (kernels/cpu_calibrate.py):
# the tests check the C paths' arithmetic, which must hold where they lose as well as where they win
os.environ.setdefault("DSV3LAB_CPU_KERNELS", "all")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# forward passes, loaded weights, decoding and FP8 references: everything that runs the engine's
# GEMMs or compares their results (the Triton kernels do not go through the bf16 policy)
NUMERICS_MODULES = {"test_engine", "test_parity", "test_checkpoint", "test_generate", "test_fp8_ref",
                    "test_cpu_bf16", "test_family", "test_cpu_decode"}


def pytest_configure(config):
    config.addinivalue_line("markers", "numerics: arithmetic that depends on the CPU bf16 policy "
                                       "(run under both policies by make test)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
