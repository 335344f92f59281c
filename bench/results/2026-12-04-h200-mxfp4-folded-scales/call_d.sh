#!/bin/bash
# call D: which part of the T = 4096 mxfp4 config gives inf (the committed code fails there too)
export PYTHONPATH=src:bench
P='[{"gate_up": {"BM": 64}}, {"down": {"BH": 64, "BK": 32}}, {"gate_up": {"BM": 64}, "down": {"BH": 64, "BK": 32}}, {"down": {"num_warps": 8}}]'
timeout 200 python3 bench/quantized_bench.py --out /dev/null --shapes qwen3_30b --tokens 1000,4096 --formats int4,mxfp4 \
   --bundles .carry/q_d --patches "$P" > $OUT/7_patches.log 2>&1
echo rc=$?; tail -24 $OUT/7_patches.log
