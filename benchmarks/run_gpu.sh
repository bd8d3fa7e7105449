#!/usr/bin/env bash
# Everything we measure on a GPU machine, in as few calls as possible: install without
# dependencies (the machine has torch/triton/transformers), the test suite (GPU tests included),
# time to first token against the best dense path, and the prefill attention benchmark. Results go
# to $2 (default $OUT). A device call may run 10 minutes: each stage takes 5-9; "all" needs three.
#   bash benchmarks/run_gpu.sh tests "$OUT"   # the test log is a check, not a result: not committed
#   bash benchmarks/run_gpu.sh ttft "$OUT"    # then copy ttft.* into benchmarks/results/
#   bash benchmarks/run_gpu.sh bench "$OUT"
set -uo pipefail
stage=${1:-all}
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . > "$out/pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" > "$out/versions.txt"
if [ "$stage" = tests ] || [ "$stage" = all ]; then
# Tests from a copy: from the repository root Python would also see the source tree.
# (benchmarks/ beside it: some tests check benchmark helpers)
rm -rf /tmp/sparsecomp_copy && mkdir /tmp/sparsecomp_copy && cp -r tests benchmarks /tmp/sparsecomp_copy
(cd /tmp/sparsecomp_copy && timeout 540 python3 -m pytest -q -p no:cacheprovider tests --tb=short ${PYTEST_ARGS:-} 2>&1 \
  | grep -v "DEBUG" > "$out/gpu_pytest.log"); tail -3 "$out/gpu_pytest.log"
fi
if [ "$stage" = ttft ] || [ "$stage" = all ]; then
timeout 580 python3 benchmarks/ttft.py --layers 4 --lengths 2048 8192 32768 131072 --out "$out" \
  > "$out/ttft.log" 2>&1; tail -4 "$out/ttft.log"
fi
[ "$stage" = bench ] || [ "$stage" = all ] || exit 0
timeout 400 python3 benchmarks/prefill_attention.py --lengths 8192 32768 131072 524288 --out "$out" \
  > "$out/prefill_attention.log" 2>&1; tail -16 "$out/prefill_attention.log"
grep -A9 "^tune .* N=" "$out/prefill_attention.log" > "$out/prefill_attention_tuning.log"
