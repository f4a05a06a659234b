#!/usr/bin/env bash
# Concurrent load on one NVIDIA GPU (issue 17): the matrix configs/concurrency-gpu.toml
# (SmolLM2-135M, 16 slots, up to 16 streams and 32 requests/s) and the harness's own cost at
# 16 streams. Needs the CUDA build first (about 4 min on 16 cores):
#   python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 [--sdist FILE]
# Results go to $OUT (or ./gpu-out): concurrency-gpu.{json,md,txt}, harness-overhead-gpu.json, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$PWD PYTHONUNBUFFERED=1 COLUMNS=160
export LLAMABENCH_SERVER_BIN=${LLAMABENCH_SERVER_BIN:-$HOME/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
PLUGIN=(-p pytest_llamabench.plugin)  # not pip-installed (PYTHONPATH only): load the plugin by name
python3 -c "import importlib.metadata as m, sys; sys.exit(not any(e.value.startswith('pytest_llamabench') for e in m.entry_points(group='pytest11')))" && PLUGIN=()
python3 -m pytest "${PLUGIN[@]}" -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
    --llamabench-matrix=configs/concurrency-gpu.toml --llamabench-require-gpu \
    --llamabench-json="$OUT/concurrency-gpu.json" --llamabench-log-dir="$OUT/logs" 2>&1 | tee "$OUT/concurrency-gpu.txt" | tail -60
python3 benchmarks/harness_overhead.py --only-load --load-matrix configs/concurrency-gpu.toml --load-config np16 \
    --streams 16 --n-predict 128 --reps 3 --json "$OUT/harness-overhead-gpu.json" 2>&1 | tail -8
