#!/usr/bin/env bash
# Start-to-start noise on the GPU (issue 11), on a machine with an NVIDIA GPU and no internet.
#   bash scripts/gpu-noise.sh start   copy the tree to /tmp, then in the background (setsid):
#                                     CUDA build + synthetic Q4_K_M model (in parallel), then C7 and
#                                     two variants, 5 fresh servers each, interleaved, 16 GiB budget
#   bash scripts/gpu-noise.sh wait    wait (up to 9 min) for it and copy what it wrote to $OUT
# The job runs from a copy because the device tool re-copies the checkout on every call.
# Inputs in .carry/: the llama.cpp source (trimmed llama-cpp-python 0.3.36 sdist), the gguf
# wheel, and llama.cpp's models/ggml-vocab-qwen2.gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
JOB=/tmp/llamabench-noise; REPO=$JOB/repo

case "${1:-start}" in
start)
    rm -rf "$JOB"; mkdir -p "$JOB/out"; cp -r . "$REPO"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; nproc; free -g | head -2
    setsid nohup bash "$REPO/scripts/gpu-noise.sh" job > "$JOB/out/job.txt" 2>&1 < /dev/null &
    echo "job started"
    ;;
job)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=120
    export LLAMABENCH_SERVER_BIN=$HOME/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-*.whl || exit 1
    (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
        --sdist .carry/llama-cpp-python-0.3.36.tar.gz) > "$JOB/out/build.txt" 2>&1 &
    build=$!
    (time python3 -m pytest_llamabench synth-model --shape qwen3-30b-a3b --quant q4_k_m \
        --vocab .carry/ggml-vocab-qwen2.gguf) > "$JOB/out/synth.txt" 2>&1
    wait $build
    tail -3 "$JOB/out/build.txt"; grep -E "wrote|real|error" "$JOB/out/synth.txt"
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks \
        --llamabench-matrix=configs/synthetic-noise.toml --llamabench-restarts="${RESTARTS:-5}" \
        --llamabench-vram-budget=16GiB --llamabench-workload="${WORKLOAD:-short}" \
        --llamabench-json="$JOB/out/noise.json" > "$JOB/out/noise.txt" 2>&1
    echo "job done: $?"
    ;;
wait)
    for _ in $(seq 1 108); do grep -q "job done" "$JOB/out/job.txt" 2>/dev/null && break; sleep 5; done
    cp "$JOB"/out/* "$OUT/" 2>/dev/null
    tail -5 "$JOB/out/job.txt"; tail -30 "$JOB/out/noise.txt" 2>/dev/null
    ;;
esac
