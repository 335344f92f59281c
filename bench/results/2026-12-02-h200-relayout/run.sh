#!/usr/bin/env bash
# Behaviour check of the re-layout on an H200: the tree before it (commit 203b556, unpacked into .old/) and the
# tree after it run the same launcher parity script and GPU tests, alternating old / new / old / new, in one
# process lifetime of the machine. From the repository root:
#   mkdir .old && git archive 203b556 src bench tests pyproject.toml | tar -x -C .old
#   OUT=<folder> bash bench/results/2026-12-02-h200-relayout/run.sh
set -u
: "${OUT:?set OUT to the output folder}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
root=$(pwd)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/run.log" 2>&1
parity() {  # $1: tree (. or .old), $2: run name
  (cd "$1" && PYTHONPATH=src timeout 200 python3 bench/gpu_parity.py --out "/tmp/parity_$2" --iters 20 \
    > /dev/null 2>> "$OUT/run.log")
  echo "parity $2 exit $? after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
  cp "/tmp/parity_$2/parity.log" "$OUT/parity_$2.log"
}
parity .old old1
parity . new1
parity .old old2
parity . new2
(cd .old && PYTHONPATH=src timeout 150 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider) \
  > "$OUT/pytest_gpu_old.log" 2>&1
echo "pytest old exit $? after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
PYTHONPATH=src timeout 150 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider > "$OUT/pytest_gpu_new.log" 2>&1
echo "pytest new exit $? after $(( $(date +%s) - start )) s" >> "$OUT/run.log"
cd "$root"
tail -n 3 "$OUT"/pytest_gpu_*.log; grep -h "failures" "$OUT"/parity_*.log; cat "$OUT/run.log"
