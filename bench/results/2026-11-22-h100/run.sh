#!/usr/bin/env bash
# The H100 run behind this folder, from the repository root: OUT=<folder> bash bench/results/2026-11-22-h100/run.sh
# 1. tune the sm_90 kernel-config table for Qwen3-Next's decode buckets (the other entries of
#    configs/sm90.json came from `moetrt tune --preset qwen3_next|qwen3_30b --tokens 1,64,512,4096` on the same
#    H100 kind before the fused decode kernel and PDL existed as candidates), 2. launcher parity + timings over every BENCH.md shape and token count,
# 3. the GPU tests, 4. the benchmark against the transformers experts implementations (deadline-bounded).
set -u
: "${OUT:?set OUT to the output folder}"
export PYTHONPATH=src PYTHONUNBUFFERED=1
start=$(date +%s)
left() { local n=$((${1} - ($(date +%s) - start))); echo $((n > 10 ? n : 10)); }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 120 python3 -m moetrt.cli tune --preset qwen3_next --tokens 1,8,64 -j 16 2>&1 | grep -v '^  ' 
  echo "tuned after $(( $(date +%s) - start )) s"
} > "$OUT/run.log" 2>&1
cp src/moetrt/plugins/moe/configs/sm90.json "$OUT/"
timeout "$(left 330)" python3 bench/gpu_parity.py --out "$OUT" --iters 20 --save-bundles /tmp/moetrt_bundles \
  > /dev/null 2>> "$OUT/run.log"
echo "parity done after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
timeout 150 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
echo "pytest exit $? after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
bundles=()
for f in /tmp/moetrt_bundles/*.bin; do [ -e "$f" ] && bundles+=(--bundle "$(basename "$f" .bin)=$f"); done
deadline=$(left 520)
mkdir -p "$OUT/bench"
timeout "$(left 575)" python3 bench/moe_bench.py --out "$OUT/bench" --deadline-s "$deadline" "${bundles[@]}" \
  > /tmp/moe_bench_stdout.txt 2>&1 || echo "moe_bench exit $?" >> "$OUT/run.log"
tail -n 40 /tmp/moe_bench_stdout.txt >> "$OUT/run.log"
echo "bench done after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
tail -n 45 "$OUT/parity.log"; tail -n 5 "$OUT/pytest_gpu.log"; cat "$OUT/run.log"
