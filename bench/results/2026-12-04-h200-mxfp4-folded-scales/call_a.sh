#!/bin/bash
# call A: re-tune the mxfp4 decode entries with the folded decoder, then the mxfp4 GPU tests
export PYTHONPATH=src:bench
T=$OUT/sm90.json
cp src/moetrt/kernels/configs/sm90.json $T
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > $OUT/0_device.txt
for p in qwen3_next qwen3_30b; do
  s=$(date +%s)
  timeout 150 python3 -m moetrt.cli tune --preset $p --weights mxfp4 --tokens 1,8,64 --rounds tiles -o $T -j 16 > $OUT/1_tune_$p.log 2>&1
  echo "tune $p rc=$? $(( $(date +%s) - s )) s"
done
s=$(date +%s)
timeout 230 python3 -m pytest -m gpu -q -n 8 tests/gpu/test_gpu_ptx_decoders.py tests/gpu/test_gpu_kernels.py \
  -k "ptx or mxfp4_tile or across_scale_groups or (quantized_experts and mxfp4)" > $OUT/2_gpu_tests.log 2>&1
echo "tests rc=$? $(( $(date +%s) - s )) s"; tail -3 $OUT/2_gpu_tests.log
