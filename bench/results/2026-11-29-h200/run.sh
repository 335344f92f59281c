#!/usr/bin/env bash
# The H200 run behind this folder, from the repository root: OUT=<folder> bash bench/results/2026-11-29-h200/run.sh
# The same steps as ../2026-11-22-h100/run.sh without re-tuning: the committed sm_90 table
# (src/moetrt/plugins/moe/configs/sm90.json, tuned on an H100) is measured as shipped on an H200 (also SM 9.0).
# 1. launcher parity + timings over every BENCH.md shape and token count (T = 0 included), 2. the GPU tests
# (kernels, launcher, the plugin's enqueue with TensorRT-style arguments), 3. the benchmark against the
# transformers experts implementations (deadline-bounded).
set -u
: "${OUT:?set OUT to the output folder}"
export PYTHONPATH=src PYTHONUNBUFFERED=1
start=$(date +%s)
left() { local n=$((${1} - ($(date +%s) - start))); echo $((n > 10 ? n : 10)); }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/run.log" 2>&1
timeout "$(left 150)" python3 bench/gpu_parity.py --out "$OUT" --iters 20 --save-bundles /tmp/moetrt_bundles \
  > /dev/null 2>> "$OUT/run.log"
echo "parity exit $? after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
timeout "$(left 260)" python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
bundles=()
for f in /tmp/moetrt_bundles/*.bin; do [ -e "$f" ] && bundles+=(--bundle "$(basename "$f" .bin)=$f"); done
deadline=$(left 500)
mkdir -p "$OUT/bench"
timeout "$(left 560)" python3 bench/moe_bench.py --out "$OUT/bench" --deadline-s "$deadline" "${bundles[@]}" \
  > /tmp/moe_bench_stdout.txt 2>&1 || echo "moe_bench exit $?" >> "$OUT/run.log"
tail -n 40 /tmp/moe_bench_stdout.txt >> "$OUT/run.log"
echo "bench done after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
tail -n 45 "$OUT/parity.log"; tail -n 5 "$OUT/pytest_gpu.log"; cat "$OUT/run.log"
