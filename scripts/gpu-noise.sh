#!/usr/bin/env bash
# Start-to-start noise on the GPU (issue 11), on a machine with an NVIDIA GPU and no internet:
#   phase "setup": the CUDA llama-server build and the synthetic Q4_K_M model (in parallel);
#   phase "noise": C7 and two variants, 5 fresh servers each, interleaved, under a 16 GiB budget.
# Inputs in .carry/: the llama.cpp source (trimmed llama-cpp-python 0.3.36 sdist), the gguf
# wheel, and llama.cpp's models/ggml-vocab-qwen2.gguf. Results go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=120
export LLAMABENCH_SERVER_BIN=$HOME/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-*.whl || exit 1

case "${1:-setup}" in
setup)
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; nproc; free -g | head -2
    (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
        --sdist .carry/llama-cpp-python-0.3.36.tar.gz) > "$OUT/build.log" 2>&1 &
    build=$!
    (time python3 -m pytest_llamabench synth-model --shape qwen3-30b-a3b --quant q4_k_m \
        --vocab .carry/ggml-vocab-qwen2.gguf) > "$OUT/synth.log" 2>&1
    wait $build
    tail -3 "$OUT/build.log"; grep -E "wrote|real|error" "$OUT/synth.log"
    ;;
noise)
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks \
        --llamabench-matrix=configs/synthetic-noise.toml --llamabench-restarts="${RESTARTS:-5}" \
        --llamabench-vram-budget=16GiB --llamabench-workload="${WORKLOAD:-short}" \
        --llamabench-json="$OUT/noise.json" 2>&1 | tee "$OUT/noise.txt" | tail -40
    cp "$OUT/noise.md" "$OUT/noise-table.md" 2>/dev/null
    ;;
esac
