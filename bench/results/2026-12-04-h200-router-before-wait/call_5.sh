#!/bin/bash
# layers chained: the table's config against PDL mode 2, PDL mode 1 and router BE 16 (patch0..2), twice
export PYTHONPATH=src:bench
FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT
for i in 1 2; do
  for V in table patch0 patch1 patch2; do
    timeout 100 python3 bench/layer_chain.py --shapes qwen3_next,qwen3_30b --tokens 1,8,64 --layers 4 --bundle qwen3_next=.carry/bp/qwen3_next_native_${V}_sm90.bin --bundle qwen3_30b=.carry/bp/qwen3_30b_native_${V}_sm90.bin --out $OUT/5_chain_${V}_$i.jsonl > $OUT/5_chain_${V}_$i.log 2>&1; echo "rc $?"
    echo "== $V $i"; python3 -c "
import json
print(' '.join(f\"{r['shape'][:6]}/{r['T']}/{r['layers']}:{r['us_per_layer']}:{r['ok']}\" for r in map(json.loads, open('$OUT/5_chain_${V}_$i.jsonl'))))"
  done
done
for F in int4 mxfp4 fp8_block+a8; do
  timeout 150 python3 bench/layer_chain.py --format $F --shapes qwen3_next,qwen3_30b --tokens 1,8,64 --layers 4 --bundle qwen3_next=.carry/b_new/qwen3_next_${F}_table_sm90.bin --bundle qwen3_30b=.carry/b_new/qwen3_30b_${F}_table_sm90.bin --out $OUT/6_chain_$F.jsonl > $OUT/6_chain_$F.log 2>&1; echo "rc $?"
  echo "== $F"; python3 -c "
import json
print(' '.join(f\"{r['shape'][:6]}/{r['T']}/{r['layers']}:{r['us_per_layer']}:{r['ok']}\" for r in map(json.loads, open('$OUT/6_chain_$F.jsonl'))))"
done
tar -czf $FINAL/call5.tgz -C /tmp/w .
