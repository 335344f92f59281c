#!/bin/bash
# call C: prefill A/B again (its logs), then GPT-OSS-20B and Mixtral mxfp4 decode entries re-tuned with the folded
# decoder and timed against the committed code and table, alternately
export PYTHONPATH=src:bench
run() {  # label tree bundles shapes tokens
  s=$(date +%s)
  (cd $2 && timeout 150 python3 bench/quantized_bench.py --out /dev/null --shapes $4 \
     --tokens $5 --formats native,mxfp4 --bundles $3 > $OUT/$1.log 2>&1)
  echo "$1 rc=$? $(( $(date +%s) - s )) s"
}
run 4_new . .carry/q_new qwen3_next,qwen3_30b 512,4096
run 4_old .carry/old ../q_old qwen3_next,qwen3_30b 512,4096
T=$OUT/sm90.json
cp src/moetrt/kernels/configs/sm90.json $T
for p in gpt_oss_20b mixtral; do
  s=$(date +%s)
  timeout 170 python3 -m moetrt.cli tune --preset $p --weights mxfp4 --tokens 1,8,64 --rounds tiles -o $T -j 16 >> $OUT/5_tune.log 2>&1
  echo "tune $p rc=$? $(( $(date +%s) - s )) s"
done
cp $T src/moetrt/kernels/configs/sm90.json
run 6_new . .carry/q_new_c gpt_oss_20b,mixtral 1,8,64
run 6_old .carry/old ../q_old gpt_oss_20b,mixtral 1,8,64
run 6_new2 . .carry/q_new_c gpt_oss_20b,mixtral 1,8,64
run 6_old2 .carry/old ../q_old gpt_oss_20b,mixtral 1,8,64
for f in 4_new 4_old 6_new 6_old 6_new2 6_old2; do echo "== $f"; grep -iE "failures" $OUT/$f.log | head -3; done
