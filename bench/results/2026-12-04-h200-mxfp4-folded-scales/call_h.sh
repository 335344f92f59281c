#!/bin/bash
# call H: DeepSeek-V3's mxfp4 decode entries re-tuned with the folded decoder, then old and new alternately
export PYTHONPATH=src:bench
T=$OUT/sm90.json
cp src/moetrt/kernels/configs/sm90.json $T
s=$(date +%s)
timeout 170 python3 -m moetrt.cli tune --preset deepseek_v3 --weights mxfp4 --tokens 1,8,64 --rounds tiles -o $T -j 16 > $OUT/13_tune.log 2>&1
echo "tune rc=$? $(( $(date +%s) - s )) s"; grep "tiles\]" $OUT/13_tune.log
cp $T src/moetrt/kernels/configs/sm90.json
run() {  # label tree bundles
  s=$(date +%s)
  (cd $2 && timeout 60 python3 bench/quantized_bench.py --out /dev/null --shapes deepseek_v3 --tokens 1,8,64 \
     --formats native,mxfp4 --bundles $3 > $OUT/$1.log 2>&1)
  echo "$1 rc=$? $(( $(date +%s) - s )) s"; grep -v '^{' $OUT/$1.log | tail -8
}
run 14_new . .carry/q_new_h
run 14_old .carry/old ../q_old
