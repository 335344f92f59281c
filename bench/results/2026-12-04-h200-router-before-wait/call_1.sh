#!/bin/bash
# routing picks two per reduction: GPU tests, then the table's bundles of this tree (new) and the previous commit (old)
set -x
export PYTHONPATH=src:bench
R=$PWD; FINAL=$OUT; OUT=/tmp/w; mkdir -p $OUT
nvidia-smi -L
timeout 120 python3 -m pytest -m gpu -q tests/gpu/test_gpu_select_experts.py 2>&1 | tail -5 > $OUT/1_gpu_select.log; cat $OUT/1_gpu_select.log
Q="--shapes qwen3_next,qwen3_30b --tokens 1,2,8,64 --formats native,int4"
for i in 1 2; do
  for T in new old; do
    if [ $T = new ]; then D=$R; else D=$R/.carry/old; fi
    (cd $D && PYTHONPATH=src:bench timeout 150 python3 bench/quantized_bench.py --out $OUT/2_${T}_$i.jsonl $Q --bundles $R/.carry/b_$T > $OUT/2_${T}_$i.log 2>&1)
    tail -22 $OUT/2_${T}_$i.log
  done
done
for T in new old; do
  if [ $T = new ]; then D=$R; else D=$R/.carry/old; fi
  (cd $D && PYTHONPATH=src:bench timeout 120 python3 bench/quantized_bench.py --out $OUT/3_${T}.jsonl --shapes mixtral,gpt_oss_20b,deepseek_v3 --tokens 1,8 --formats native --bundles $R/.carry/b_$T > $OUT/3_${T}.log 2>&1)
  tail -10 $OUT/3_${T}.log
done
for T in new old; do
  if [ $T = new ]; then D=$R; else D=$R/.carry/old; fi
  (cd $D && PYTHONPATH=src:bench timeout 100 python3 bench/stage_times.py --prefixes --shapes qwen3_next,qwen3_30b --tokens 1,8 --bundle qwen3_next=$R/.carry/b_$T/qwen3_next_native_table_sm90.bin --bundle qwen3_30b=$R/.carry/b_$T/qwen3_30b_native_table_sm90.bin --out $OUT/4_prefixes_$T.jsonl > $OUT/4_prefixes_$T.log 2>&1)
  grep -h '"kernel"\|stage' $OUT/4_prefixes_$T.jsonl | head -30
done
tar -czf $FINAL/call1.tgz -C /tmp/w .
