#!/bin/bash
# One lease of a GPU machine (the workplace's `device` tool): the cuda backend's GPU tests, then bench/gpu.py once
# per "SECONDS:ARGUMENTS" given. Runs from the repository root under that machine's python3 (CuPy, numba, torch,
# transformers installed there); the pure-Python gguf wheel, which writing the tests' .nq files needs, travels in
# .whl/. Every stage has its own time limit, so a hang or a failure in one still leaves the others' output; logs
# and JSON go to $OUT. NQ_COMMIT names the tree's commit in the JSON (the copy there has no .git: paste the hash).
#   NQ_COMMIT=HASH [TESTS="pytest -k expression"] bash bench/device_check.sh TEST_SECONDS ["SECONDS:ARGS" ...]
# e.g. bash bench/device_check.sh 90 "60:--parts gemv --bits 1.0" "170:--parts models --models llama-2-7b"
# The wheel: pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
set -u
TEST_S=${1:-150}; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/smi.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, cupy, numpy, numba
from runtime.backends import cuda_problem
print("python", platform.python_version(), "cupy", cupy.__version__, "numpy", numpy.__version__, "numba",
      numba.__version__, "cuda_problem:", cuda_problem(), "load", open("/proc/loadavg").read().split()[0])
PY
stage() {  # stage NAME SECONDS COMMAND...: one stage, its log in $OUT/NAME.log, its exit status printed
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s (limit $limit)"; grep -v -i warn "$OUT/$name.log" | tail -n 20
}
stage gpu-tests "$TEST_S" python3 -m pytest -p no:cacheprovider -o addopts=--import-mode=importlib -q -rfE \
  --tb=short tests/cuda -k "${TESTS:-not emulated}"
i=0
for spec in "$@"; do
  i=$((i + 1))
  # shellcheck disable=SC2086  # the arguments are meant to split
  stage "gpu-bench-$i" "${spec%%:*}" python3 -m bench.gpu ${spec#*:}
done
