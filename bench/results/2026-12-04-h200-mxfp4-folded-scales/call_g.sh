#!/bin/bash
# call G: the mxfp4 prefill entries (T <= 512, unbounded) of both Qwen3 shapes re-tuned with the folded decoder and
# the plan's refusal, then timed with bf16
export PYTHONPATH=src:bench
T=$OUT/sm90.json
cp src/moetrt/kernels/configs/sm90.json $T
for p in qwen3_30b qwen3_next; do
  s=$(date +%s)
  timeout 140 python3 -m moetrt.cli tune --preset $p --weights mxfp4 --tokens 512,4096 --rounds tiles -o $T -j 16 > $OUT/11_tune_$p.log 2>&1
  echo "tune $p rc=$? $(( $(date +%s) - s )) s"; grep "tiles\]" $OUT/11_tune_$p.log
done
cp $T src/moetrt/kernels/configs/sm90.json
s=$(date +%s)
timeout 100 python3 bench/quantized_bench.py --out $OUT/12_bench.jsonl --shapes qwen3_next,qwen3_30b --tokens 512,4096 \
  --formats native,mxfp4 > $OUT/12_bench.log 2>&1
echo "bench rc=$? $(( $(date +%s) - s )) s"; grep -v '^{' $OUT/12_bench.log | tail -10
