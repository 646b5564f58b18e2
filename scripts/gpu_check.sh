#!/usr/bin/env bash
# One-call GPU check for the Triton kernels (issue 5). Run from the repository root on a machine
# with a CUDA GPU (e.g. the lent H200: torch 2.11 + triton 3.6 preinstalled). ~5-8 minutes.
#   bash scripts/gpu_check.sh            results go to $OUT (or ./results/gpu_check if unset)
# Installs nothing but this repo (editable, --no-deps) when it is not importable yet.
set -uo pipefail
OUT="${OUT:-results/gpu_check}"
mkdir -p "$OUT"
export TRITON_INTERPRET=0          # conftest defaults it to 1; GPU tests need the compiler
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null && PY=.venv/bin/python

{
  echo "== environment"; date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"

if ! "$PY" -c "import dsv3lab.kernels" 2>/dev/null; then
  "$PY" -m pip install -q -e . --no-deps 2>&1 | tail -2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== pytest -m gpu (kernels)" | tee "$OUT/pytest_gpu.txt"
timeout 240 "$PY" -m pytest -q -m gpu tests/test_kernels*.py -rA --durations=10 2>&1 | tee -a "$OUT/pytest_gpu.txt"
echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.txt"

echo "== pytest (kernels, compiled, non-gpu tests on CUDA too)" | tee "$OUT/pytest_all.txt"
timeout 90 "$PY" -m pytest -q -x tests/test_kernels*.py 2>&1 | tail -15 | tee -a "$OUT/pytest_all.txt"

echo "== dsv3lab bench kernels" | tee "$OUT/bench.txt"
timeout 300 "$PY" -m dsv3lab bench kernels --out "$OUT/bench-kernels.json" 2>&1 | tee -a "$OUT/bench.txt"
echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
ls -la "$OUT"
