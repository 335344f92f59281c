#!/bin/bash
# layers chained in one graph (each layer's RMS kept), the new tree against the previous commit, alternating
export PYTHONPATH=src:bench
R=$PWD; FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT
nvidia-smi -L
cp $R/bench/layer_chain.py $R/.carry/old/bench/layer_chain.py
for i in 1 2; do
  for T in new old; do
    if [ $T = new ]; then D=$R; else D=$R/.carry/old; fi
    (cd $D && PYTHONPATH=src:bench timeout 120 python3 bench/layer_chain.py --shapes qwen3_next,qwen3_30b,gpt_oss_20b --tokens 1,8,64 --layers 4 --bundle qwen3_next=$R/.carry/b_$T/qwen3_next_native_table_sm90.bin --bundle qwen3_30b=$R/.carry/b_$T/qwen3_30b_native_table_sm90.bin --bundle gpt_oss_20b=$R/.carry/b_$T/gpt_oss_20b_native_table_sm90.bin --out $OUT/chain_${T}_$i.jsonl > $OUT/chain_${T}_$i.log 2>&1); echo "rc $?"
    echo "== $T $i"; python3 -c "
import json
print(' '.join(f\"{r['shape'][:6]}/{r['T']}/{r['layers']}:{r['us_per_layer']}:{r['rel_err_first_layer']:.1e}:{r['rel_err_last_layer']:.1e}\" for r in map(json.loads, open('$OUT/chain_${T}_$i.jsonl'))))"
  done
done
tar -czf $FINAL/call4.tgz -C /tmp/w .
