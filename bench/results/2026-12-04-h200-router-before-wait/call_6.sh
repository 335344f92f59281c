#!/bin/bash
# the table with Qwen3-Next's T <= 64 router at BE 16: every format against the oracle, and in a chain
export PYTHONPATH=src:bench
FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT
timeout 200 python3 bench/quantized_bench.py --out $OUT/7_table_be16.jsonl --shapes qwen3_next --tokens 1,8,64 --formats native,int4,mxfp4,fp8_block+a8 --bundles .carry/bt > $OUT/7_table_be16.log 2>&1; grep -A20 "^shape" $OUT/7_table_be16.log
for F in native int4; do
  timeout 120 python3 bench/layer_chain.py --format $F --shapes qwen3_next --tokens 64 --layers 4 --bundle qwen3_next=.carry/bt/qwen3_next_${F}_table_sm90.bin --out $OUT/7_chain_$F.jsonl > $OUT/7_chain_$F.log 2>&1; echo "rc $?"; cut -c1-150 $OUT/7_chain_$F.jsonl
done
tar -czf $FINAL/call6.tgz -C /tmp/w .
