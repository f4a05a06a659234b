#!/usr/bin/env bash
# The GPU run (issue 5), on a machine with an NVIDIA GPU and no internet:
#   phase "setup":  CUDA llama-server build + both synthetic models (in parallel),
#                   then the user's own command `pytest -m gpu --config=C7`,
#                   then the whole synthetic matrix in the background.
#   phase "wait":   wait for the matrix and collect its report.
# Inputs in .carry/: a llama.cpp source tarball (trimmed llama-cpp-python 0.3.36
# sdist), the gguf wheel, and llama.cpp's models/ggml-vocab-qwen2.gguf (the real
# Qwen2/Qwen3 tokenizer). Results go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
WORK=/tmp/llamabench-gpu; mkdir -p "$WORK"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=120
export LLAMABENCH_MATRIX=configs/synthetic-qwen3-30b-a3b.toml
export LLAMABENCH_VRAM_BUDGET=16GiB
export LLAMABENCH_SERVER_BIN=$HOME/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server
PYTEST=(python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider)

case "${1:-setup}" in
setup)
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; nproc; free -g | head -2; df -h /root | tail -1
    (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
        --sdist .carry/llama-cpp-python-0.3.36-llama.cpp-src.tar.gz) > "$WORK/build.log" 2>&1 &
    build=$!
    for q in q4_k_m q8_0; do
        (time python3 -m pytest_llamabench synth-model --shape qwen3-30b-a3b --quant $q \
            --vocab .carry/ggml-vocab-qwen2.gguf) >> "$WORK/synth.log" 2>&1
    done
    wait $build; tail -3 "$WORK/build.log"; cat "$WORK/synth.log" | grep -E "wrote|real|error"
    cp "$WORK/build.log" "$WORK/synth.log" "$OUT/" 2>/dev/null
    "${PYTEST[@]}" tests/test_gpu.py tests/test_classify.py -q -m "gpu or not gpu" 2>&1 | tail -3
    # the native /completion stream, by hand (first GPU run: the client saw no response)
    "$LLAMABENCH_SERVER_BIN" -m ~/.cache/pytest-llamabench/synthetic-models/Qwen3-30B-A3B-synthetic-Q4_K_M.gguf \
        --host 127.0.0.1 --port 18080 -c 4096 -np 1 --fit off -ngl 99 --n-cpu-moe 24 > "$WORK/probe.log" 2>&1 &
    probe=$!
    for _ in $(seq 1 60); do curl -sf 127.0.0.1:18080/health >/dev/null && break; sleep 1; done
    curl -sN -m 20 127.0.0.1:18080/completion -H 'Content-Type: application/json' \
        -d '{"prompt":[9707,1879,11,1084,374],"n_predict":8,"ignore_eos":true,"stream":true,"return_tokens":true}' \
        -o "$WORK/probe.out" -w 'probe /completion stream: http %{http_code}, %{size_download} bytes\n'
    head -c 600 "$WORK/probe.out"; echo; kill $probe; wait $probe 2>/dev/null; cp "$WORK/probe.out" "$OUT/" 2>/dev/null
    # the user's own command, exactly (matrix, binary and budget come from the environment)
    "${PYTEST[@]}" -m gpu --config=C7 --llamabench-json="$OUT/c7.json" benchmarks 2>&1 | tee "$OUT/c7.txt" | tail -25
    setsid nohup "${PYTEST[@]}" -m gpu benchmarks --llamabench-json="$WORK/matrix.json" \
        > "$WORK/matrix.txt" 2>&1 < /dev/null &
    echo "matrix started"
    ;;
wait)
    for _ in $(seq 1 110); do
        grep -qE "passed|failed|error" <(tail -1 "$WORK/matrix.txt") && break
        sleep 5
    done
    cp "$WORK/matrix.json" "$WORK/matrix.txt" "$WORK/matrix.md" "$OUT/" 2>/dev/null
    tar czf "$OUT/logs.tgz" .llamabench/logs 2>/dev/null
    tail -45 "$WORK/matrix.txt"
    ;;
esac
