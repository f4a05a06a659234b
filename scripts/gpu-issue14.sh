#!/usr/bin/env bash
# Issue 14 on the GPU (H200, 16 GiB budget), on a machine with no internet:
#   bash scripts/gpu-issue14.sh start   copy the tree to /tmp, then in the background (setsid):
#       1. CUDA build (skipped if cached), a CPU build of the same llama.cpp with its --fit option
#          removed (C4: the user's build that lacked --fit), and both synthetic Qwen3.5-35B-A3B
#          models (Q8_0 36.9 GB, Q4_K_M 21.2 GB: ~58 GB of disk), in parallel;
#       2. the user's matrix configs/qwen35-35b-a3b.toml, C1 C2 C2a C2b C3 C4r C5 C6 C7 C8, the
#          short workload (the plan is printed before each launch and stored beside the measurement);
#       3. C4 on the build without --fit (an unsupported-argument outcome, as the user had);
#       4. the auto-fit searches (configs/qwen35-35b-a3b-search.toml), both quants, with --fit on.
#   bash scripts/gpu-issue14.sh wait    wait (up to 9.5 min) for it and copy what it wrote to $OUT
# Inputs in .carry/: the llama.cpp source (llama-cpp-python 0.3.36 sdist), the gguf wheel, and
# llama.cpp's models/ggml-vocab-qwen2.gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
JOB=/tmp/llamabench-i14; REPO=$JOB/repo

case "${1:-start}" in
start)
    rm -rf "$JOB"; mkdir -p "$JOB/out"; cp -r . "$REPO"
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; nproc; free -g | head -2; df -h /root | tail -1
    setsid nohup bash "$REPO/scripts/gpu-issue14.sh" job > "$JOB/out/job.txt" 2>&1 < /dev/null &
    echo "job started"
    ;;
job)
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=160
    CACHE=$HOME/.cache/pytest-llamabench
    CUDA_BIN=$CACHE/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server
    NOFIT=$JOB/nofit/build/bin/llama-server
    MODELS=$JOB/models   # the user's file names -> the synthetic files
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-*.whl || exit 1
    started=$(date +%s)
    build=""
    if [ ! -x "$CUDA_BIN" ]; then
        (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
            --sdist .carry/llama-cpp-python-0.3.36.tar.gz) > "$JOB/out/build.txt" 2>&1 &
        build=$!
    fi
    (   # the pinned llama.cpp, CPU only, with the one add_opt block of --fit deleted from common/arg.cpp:
        # its argument parser rejects --fit exactly as a build that predates the flag does
        mkdir -p "$JOB/nofit" && tar xzf .carry/llama-cpp-python-0.3.36.tar.gz -C "$JOB/nofit" &&
        src=$(echo "$JOB"/nofit/llama_cpp_python-*/vendor/llama.cpp) &&
        python3 - "$src/common/arg.cpp" <<'EOF' &&
import re, sys
path = sys.argv[1]
text = open(path).read()
new = re.sub(r'    add_opt\(common_arg\(\n        \{ "-fit", "--fit" \}.*?\.set_env\("LLAMA_ARG_FIT"\)\);\n', "", text, count=1, flags=re.S)
assert new != text, "the --fit option was not found"
open(path, "w").write(new)
print("removed --fit from", path)
EOF
        cmake -S "$src" -B "$JOB/nofit/build" -G Ninja \
            $(python3 -c "from pytest_llamabench.server.build import BuildSpec; print(' '.join(BuildSpec().cmake_flags()))") &&
        ninja -C "$JOB/nofit/build" -j 8 llama-server && "$NOFIT" --version
    ) > "$JOB/out/nofit-build.txt" 2>&1 &
    nofit=$!
    for q in q8_0 q4_k_m; do
        (time python3 -m pytest_llamabench synth-model --shape qwen35-35b-a3b --quant $q \
            --vocab .carry/ggml-vocab-qwen2.gguf) >> "$JOB/out/synth.txt" 2>&1
    done
    mkdir -p "$MODELS"
    for q in Q8_0 Q4_K_M; do
        ln -sf "$CACHE/synthetic-models/Qwen3.5-35B-A3B-synthetic-$q.gguf" "$MODELS/Qwen3.5-35B-A3B-$q.gguf"
    done
    wait $build $nofit   # (unquoted: $build is empty when the CUDA build was cached)
    echo "setup: $(( $(date +%s) - started )) s"; tail -2 "$JOB/out/build.txt" 2>/dev/null
    tail -3 "$JOB/out/nofit-build.txt"; grep -E "wrote|real|rror" "$JOB/out/synth.txt"
    PYTEST=(python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu
            --llamabench-models-dir="$MODELS" --llamabench-vram-budget=16GiB)
    configs=(); for c in C1 C2 C2a C2b C3 C4r C5 C6 C7 C8; do configs+=(--llamabench-config=$c); done
    "${PYTEST[@]}" benchmarks/test_matrix.py --llamabench-matrix=configs/qwen35-35b-a3b.toml "${configs[@]}" \
        --llamabench-workload=short --llamabench-server-bin="$CUDA_BIN" --llamabench-json="$JOB/out/matrix.json" \
        --llamabench-log-dir="$JOB/out/logs-matrix" > "$JOB/out/matrix.txt" 2>&1
    echo "matrix: $? after $(( $(date +%s) - started )) s"
    "${PYTEST[@]}" benchmarks/test_matrix.py --llamabench-matrix=configs/qwen35-35b-a3b.toml --llamabench-config=C4 \
        --llamabench-workload=short --llamabench-server-bin="$NOFIT" --llamabench-json="$JOB/out/c4-nofit.json" \
        --llamabench-log-dir="$JOB/out/logs-c4" > "$JOB/out/c4-nofit.txt" 2>&1
    echo "C4: $?"
    "${PYTEST[@]}" benchmarks/test_search.py --llamabench-matrix=configs/qwen35-35b-a3b-search.toml \
        --llamabench-server-bin="$CUDA_BIN" --llamabench-json="$JOB/out/search.json" \
        --llamabench-log-dir="$JOB/out/logs-search" > "$JOB/out/search.txt" 2>&1
    echo "search: $? after $(( $(date +%s) - started )) s"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv   # nothing may be left on the GPU
    python3 scripts/plan_table.py "$JOB/out/matrix.json" "$JOB/out/c4-nofit.json" --search "$JOB/out/search.json" \
        > "$JOB/out/plan-table.md" 2>&1
    (cd "$JOB/out" && tar czf logs.tgz logs-* build.txt nofit-build.txt synth.txt c4-nofit.json matrix.md search.md 2>/dev/null)
    echo "job done"
    ;;
wait)
    for _ in $(seq 1 114); do grep -q "job done" "$JOB/out/job.txt" 2>/dev/null && break; sleep 5; done
    cp "$JOB"/out/{job.txt,matrix.json,matrix.txt,plan-table.md,c4-nofit.txt,search.json,search.txt,logs.tgz} "$OUT/" 2>/dev/null
    tail -12 "$JOB/out/job.txt"; tail -25 "$JOB/out/matrix.txt" 2>/dev/null; tail -8 "$JOB/out/c4-nofit.txt" 2>/dev/null
    tail -12 "$JOB/out/search.txt" 2>/dev/null; cat "$JOB/out/plan-table.md" 2>/dev/null
    ;;
esac
