#!/usr/bin/env bash
# Run benchmarks on a lent GPU machine: install the carried wheels, then each benchmark given as
# "script.py args..." ; logs go to $OUT (or ./bench_out).   Usage: bash bench/run_on_device.sh "train_network.py --only a" ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
python3 -m pip install --quiet --no-deps wheels/*.whl 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
for job in "$@"; do
  name=$(echo "$job" | cut -d' ' -f1 | sed 's/\.py//')
  echo "=== $job"
  # shellcheck disable=SC2086
  (cd bench && timeout "${BENCH_TIMEOUT:-900}" python3 $job) > "$OUT/$name.log" 2>&1
  echo "exit $?"
  grep -E '^\{|^\||failed' "$OUT/$name.log" | tail -20
done
