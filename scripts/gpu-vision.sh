#!/usr/bin/env bash
# Vision on the GPU (issue 16), after scripts/gpu-run.sh's setup (CUDA build, the gguf wheel in
# /tmp/site, the synthetic Qwen3-30B-A3B Q4_K_M in the cache): the synthetic SmolVLM-256M-shape
# projector (written on first use, ~0.25 GB at 2048 wide) with images through the real multimodal
# path, the projector on the GPU and on the CPU, and the template check. Results in $OUT/vision/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}/vision; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=120
export LLAMABENCH_SERVER_BIN=${LLAMABENCH_SERVER_BIN:-$HOME/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server}
ls ~/.cache/pytest-llamabench/synthetic-models/Qwen3-30B-A3B-synthetic-Q4_K_M.gguf >/dev/null || \
    python3 -m pytest_llamabench synth-model --shape qwen3-30b-a3b --quant q4_k_m --vocab .carry/ggml-vocab-qwen2.gguf
python3 -m pytest -p pytest_llamabench.plugin -p no:randomly -p no:cacheprovider benchmarks/test_matrix.py -m gpu \
    --llamabench-matrix=configs/vision-gpu.toml --llamabench-json="$OUT/report.json" \
    --llamabench-log-dir="$OUT/logs" -q 2>&1 | tail -30 | tee "$OUT/pytest.txt"
grep -h "slice encoded\|decoded (batch\|clip_model_loader: model name\|CUDA0 compute buffer" "$OUT"/logs/*.log | head -20 > "$OUT/encode-lines.txt"
