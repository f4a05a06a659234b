#!/usr/bin/env bash
# Issue 12, items 15 and 16 on a GPU machine with no internet: the README's GPU steps, as written,
# with nothing else set (no LLAMABENCH_SERVER_BIN): the CUDA build from the trimmed, still pinned
# sdist; which-server finds it; the vocab comes from the build; `pytest -m gpu --config=C7` uses
# the CUDA build, and its report names the pinned commit.
# Inputs in .carry/: llama-cpp-python-0.3.36-trimmed.tar.gz (python -m pytest_llamabench
# trim-sdist llama_cpp_python-0.3.36.tar.gz -o .carry/llama-cpp-python-0.3.36-trimmed.tar.gz)
# and the gguf wheel. Results go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 COLUMNS=120
unset LLAMABENCH_SERVER_BIN
SDIST=.carry/llama-cpp-python-0.3.36-trimmed.tar.gz
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/gguf-*.whl || exit 1

# the README's GPU steps
(time python3 -m pytest_llamabench build-server --backend cuda --cuda-arch 90 --sdist "$SDIST") > "$OUT/build.log" 2>&1
tail -4 "$OUT/build.log"
python3 -m pytest_llamabench which-server | tee "$OUT/which-server.txt"
VOCAB=$(python3 -m pytest_llamabench vocab qwen2) && echo "vocab: $VOCAB"
python3 -m pytest_llamabench synth-model --shape qwen3-30b-a3b --quant q4_k_m --vocab "$VOCAB" 2>&1 | tail -2
cp ~/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/build-info.json "$OUT/" 2>/dev/null
LLAMABENCH_MATRIX=configs/synthetic-qwen3-30b-a3b.toml python3 -m pytest -p no:randomly -p no:cacheprovider \
    -m gpu --config=C7 --llamabench-vram-budget=16GiB --llamabench-json="$OUT/c7.json" benchmarks 2>&1 \
    | tee "$OUT/c7.txt" | tail -15

# what must hold (prints FAIL lines; exit 1 if any)
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1]); bad = []
which = (out / "which-server.txt").read_text()
if "cuda-sm90-avx2/bin/llama-server" not in which: bad.append(f"which-server did not pick the CUDA build: {which}")
if "commit 0c1e570" not in which: bad.append("which-server's --version does not name commit 0c1e570")
report = json.loads((out / "c7.json").read_text())
binary = report.get("binary") or {}
if "cuda-sm90" not in str(binary.get("path")): bad.append(f"pytest -m gpu used {binary.get('path')}")
if "commit 0c1e570" not in str(binary.get("version")): bad.append(f"the report's version: {binary.get('version')}")
builds = {str((r.get("server") or {}).get("build_info")) for r in report.get("results", [])}
if builds != {"b1-0c1e570"}: bad.append(f"/props build_info: {builds}")
info = json.loads((out / "build-info.json").read_text())
if not info["source"]["trimmed"]: bad.append("build-info.json: not built from the trimmed sdist?")
print("\n".join(f"FAIL {b}" for b in bad) or "OK: CUDA build found with nothing set, commit 0c1e570 in --version and /props, trimmed sdist verified")
sys.exit(1 if bad else 0)
EOF
