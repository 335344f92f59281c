#!/bin/bash
# call B: the committed code and table (.carry/old, bundles ../q_old) against the folded mxfp4 decoder with the
# re-tuned table (bundles .carry/q_new), alternately; decode then prefill
export PYTHONPATH=src:bench
run() {  # label tree bundles tokens
  s=$(date +%s)
  (cd $2 && timeout 150 python3 bench/quantized_bench.py --out $OUT/$1.jsonl --shapes qwen3_next,qwen3_30b \
     --tokens $4 --formats native,mxfp4 --bundles $3 > $OUT/$1.log 2>&1)
  echo "$1 rc=$? $(( $(date +%s) - s )) s"
}
run 3_new . .carry/q_new 1,8,64
run 3_old .carry/old ../q_old 1,8,64
run 3_new2 . .carry/q_new 1,8,64
run 3_old2 .carry/old ../q_old 1,8,64
run 4_new . .carry/q_new 512,4096
run 4_old .carry/old ../q_old 512,4096
for f in 3_new 3_old 3_new2 3_old2 4_new 4_old; do echo "== $f"; grep -iE "fail|error" $OUT/$f.log | head -3; done
