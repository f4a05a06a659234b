#!/usr/bin/env bash
# Parallel vs serial on 2 GPUs (issue 15), on a machine with 2 NVIDIA GPUs (nvidia-h200-x2) and no internet.
#   bash scripts/gpu-parallel.sh start   copy the tree to /tmp, then in the background (setsid): the CUDA
#                                        build and both synthetic models (each skipped when already there),
#                                        then the synthetic C1-C8 matrix with -n 0 and with -n 2, both with a
#                                        16 GiB budget, then one server on both GPUs (gpus = 2,
#                                        configs/synthetic-two-gpus.toml), then benchmarks/parallel_vs_serial.py
#   bash scripts/gpu-parallel.sh wait    wait (up to 9 min) for it and copy what it wrote to $OUT
# The job runs from a copy because the device tool re-copies the checkout on every call.
# Inputs in .carry/ (as for scripts/gpu-noise.sh): the llama.cpp source (llama-cpp-python 0.3.36 sdist),
# the gguf wheel, llama.cpp's models/ggml-vocab-qwen2.gguf, and (used only when the machine lacks
# pytest-xdist) the pytest_xdist-3.8.0 and execnet-2.1.2 wheels.
# Device time (estimated from the H100 run: 314 s for all 4 workloads serially): about 3-4 min for the
# serial run and 2 min for the parallel one with WORKLOADS="short long" (the default here), 1 min for
# two-gpus; plus the CUDA build (4 min) and the models (1 min) when not already there. Call wait again
# if it returns before "job done". WORKLOADS="short medium long multi-turn" runs the whole matrix.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
JOB=/tmp/llamabench-parallel; REPO=$JOB/repo

case "${1:-start}" in
start)
    rm -rf "$JOB"; mkdir -p "$JOB/out"; cp -r . "$REPO"
    nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used --format=csv; nproc; free -g | head -2
    setsid nohup bash "$REPO/scripts/gpu-parallel.sh" job > "$JOB/out/job.txt" 2>&1 < /dev/null &
    echo "job started"
    ;;
job)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=120
    export LLAMABENCH_SERVER_BIN=$HOME/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server
    MODELS=$HOME/.cache/pytest-llamabench/synthetic-models
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-*.whl || exit 1
    python3 -c "import xdist" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site \
        .carry/pytest_xdist-*.whl .carry/execnet-*.whl || exit 1   # -n
    if [ ! -x "$LLAMABENCH_SERVER_BIN" ]; then
        (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
            --sdist .carry/llama-cpp-python-0.3.36.tar.gz) > "$JOB/out/build.txt" 2>&1 &
    fi
    for q in q4_k_m q8_0; do
        Q=$(echo $q | tr a-z A-Z)
        [ -f "$MODELS/Qwen3-30B-A3B-synthetic-$Q.gguf" ] || (time python3 -m pytest_llamabench synth-model \
            --shape qwen3-30b-a3b --quant $q --vocab .carry/ggml-vocab-qwen2.gguf) >> "$JOB/out/synth.txt" 2>&1
    done
    wait
    WL=(); for w in ${WORKLOADS:-short long}; do WL+=(--llamabench-workload="$w"); done
    PYTEST=(python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks
            --llamabench-matrix=configs/synthetic-qwen3-30b-a3b.toml --llamabench-vram-budget=16GiB "${WL[@]}")
    "${PYTEST[@]}" -n 0 --llamabench-json="$JOB/out/serial.json" > "$JOB/out/serial.txt" 2>&1
    echo "serial done: $?"
    nvidia-smi --query-gpu=index,memory.used --format=csv  # nothing left on either GPU
    "${PYTEST[@]}" -n 2 --llamabench-json="$JOB/out/parallel.json" > "$JOB/out/parallel.txt" 2>&1
    echo "parallel done: $?"
    nvidia-smi --query-gpu=index,memory.used --format=csv
    # one server on both GPUs (gpus = 2): the budget held and VRAM sampled on each
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks \
        --llamabench-matrix=configs/synthetic-two-gpus.toml --llamabench-vram-budget=16GiB \
        --llamabench-json="$JOB/out/two-gpus.json" > "$JOB/out/two-gpus.txt" 2>&1
    echo "two-gpus done: $?"
    python3 benchmarks/parallel_vs_serial.py "$JOB/out/serial.json" "$JOB/out/parallel.json" \
        --out "$JOB/out/parallel-vs-serial.md" > "$JOB/out/parallel-vs-serial.txt" 2>&1
    echo "job done: $?"
    ;;
wait)
    for _ in $(seq 1 108); do grep -q "job done" "$JOB/out/job.txt" 2>/dev/null && break; sleep 5; done
    cp "$JOB"/out/* "$OUT/" 2>/dev/null
    tar czf "$OUT/logs.tgz" -C "$JOB/repo" .llamabench/logs 2>/dev/null
    tail -8 "$JOB/out/job.txt"; cat "$JOB/out/parallel-vs-serial.txt" 2>/dev/null
    tail -4 "$JOB/out/serial.txt" "$JOB/out/parallel.txt" 2>/dev/null; tail -22 "$JOB/out/two-gpus.txt" 2>/dev/null
    ;;
esac
