#!/bin/bash
# router slices loaded before the PDL wait (whole slice): GPU tests, layers chained (RMS kept), new vs previous commit
set -x
export PYTHONPATH=src:bench
R=$PWD; FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT
nvidia-smi -L
timeout 240 python3 -m pytest -m gpu -q tests/gpu/test_gpu_select_experts.py tests/gpu/test_gpu_kernels.py -k "select or launcher_matches or programmatic or fp8_activations or routing_in_the_router or fused_decode or skewed or quantized_experts" > $OUT/1_gpu_tests.log 2>&1; tail -3 $OUT/1_gpu_tests.log
cp $R/bench/layer_chain.py $R/.carry/old/bench/layer_chain.py
for i in 1 2; do
  for T in new old; do
    if [ $T = new ]; then D=$R; else D=$R/.carry/old; fi
    (cd $D && PYTHONPATH=src:bench timeout 100 python3 bench/layer_chain.py --shapes qwen3_next,qwen3_30b,gpt_oss_20b --tokens 1,8,64 --layers 4 --bundle qwen3_next=$R/.carry/b_$T/qwen3_next_native_table_sm90.bin --bundle qwen3_30b=$R/.carry/b_$T/qwen3_30b_native_table_sm90.bin --bundle gpt_oss_20b=$R/.carry/b_$T/gpt_oss_20b_native_table_sm90.bin --out $OUT/2_chain_${T}_$i.jsonl > $OUT/2_chain_${T}_$i.log 2>&1); echo "rc $?"
    echo "== $T $i"; python3 -c "
import json
print(' '.join(f\"{r['shape'][:6]}/{r['T']}/{r['layers']}:{r['us_per_layer']}:{r['rel_err_against_unchained']:.1e}\" for r in map(json.loads, open('$OUT/2_chain_${T}_$i.jsonl'))))"
  done
done
timeout 150 python3 bench/quantized_bench.py --out $OUT/3_quantized_new.jsonl --shapes qwen3_next,qwen3_30b --tokens 1,8,64 --formats native,int4,fp8_block+a8 --bundles $R/.carry/b_new > $OUT/3_quantized_new.log 2>&1; grep -A12 "^shape" $OUT/3_quantized_new.log
tar -czf $FINAL/call3.tgz -C /tmp/w .
