#!/usr/bin/env bash
# Everything we measure on a lent GPU, in one call (device time is scarce): install without
# dependencies (the machine has torch/triton/transformers), the test suite (GPU tests included),
# the demo at 32K and 128K, and the prefill attention benchmark. Results go to $2 (default $OUT).
# A device call may run 10 minutes: "tests+demo" takes ~6, "bench" ~6; "all" needs two calls' time.
#   bash benchmarks/run_gpu.sh tests+demo "$OUT"   # then copy the files into benchmarks/results/
#   bash benchmarks/run_gpu.sh bench "$OUT"
set -uo pipefail
stage=${1:-all}
out=${2:-${OUT:-benchmarks/results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index . > "$out/pip.log" 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'triton',triton.__version__,'transformers',transformers.__version__)" > "$out/versions.txt"
if [ "$stage" != bench ]; then
# Tests from a copy: from the repository root Python would also see the source tree.
rm -rf /tmp/sparsecomp_tests && cp -r tests /tmp/sparsecomp_tests
(cd /tmp && timeout 240 python3 -m pytest -q -p no:cacheprovider sparsecomp_tests --tb=short 2>&1 \
  | grep -v "DEBUG" > "$out/gpu_pytest.log"); tail -3 "$out/gpu_pytest.log"
for n in 32768 131072; do
  check=$([ "$n" -gt 65536 ] && echo --no-check)
  timeout 200 sparsecomp demo --shape llama3-8b --layers 1 --seq-len "$n" --sink 128 --window 2048 $check \
    --json "$out/spine_demo_$n.json" > "$out/spine_demo_$n.log" 2>&1; tail -2 "$out/spine_demo_$n.log"
done
fi
[ "$stage" = tests+demo ] && exit 0
timeout 400 python3 benchmarks/prefill_attention.py --lengths 8192 32768 131072 524288 --out "$out" \
  > "$out/prefill_attention.log" 2>&1; tail -16 "$out/prefill_attention.log"
grep -A9 "^tune .* N=" "$out/prefill_attention.log" > "$out/prefill_attention_tuning.log"
