#!/bin/bash
# call E: GPU tests of every 4-bit path with the folded decoder, the plan's refusal and the fixed table; then one
# full quantized bench (every format against bf16 in one run) with this table
export PYTHONPATH=src:bench
s=$(date +%s)
timeout 330 python3 -m pytest -m gpu -q -n 8 tests/gpu/test_gpu_ptx_decoders.py tests/gpu/test_gpu_kernels.py \
  -k "ptx or mxfp4_tile or across_scale_groups or prefill_tiles or quantized_experts or (split_gate_up and (int4 or mxfp4))" > $OUT/8_gpu_tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - s )) s"; tail -3 $OUT/8_gpu_tests.log
s=$(date +%s)
timeout 200 python3 bench/quantized_bench.py --out $OUT/9_bench.jsonl --shapes qwen3_next,qwen3_30b --tokens 1,8,64,4096 \
  --formats native,fp8_block,int4,mxfp4,fp8_block+a8 > $OUT/9_bench.log 2>&1
echo "bench rc=$? $(( $(date +%s) - s )) s"; tail -42 $OUT/9_bench.log | grep -v '^{'
