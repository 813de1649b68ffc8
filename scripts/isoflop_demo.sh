#!/usr/bin/env bash
# `make isoflop-demo`: an end-to-end IsoFLOP mini study on CPU (3 budgets x 4 widths of the tiny
# family, trained on the bundled corpus), fitted and plotted into docs/isoflop/. About an hour on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SODA=.venv/bin/soda
OUT=artifacts/isoflop
DATA=artifacts/demo/shards-256
if [ ! -f $DATA/index.json ]; then
  $SODA corpus --out data/tiny --utterances 160 --text-docs 16
  [ -f artifacts/demo/tokenizer/tokenizer.json ] || $SODA tokenizer --train-tiny data/tiny/sentences.txt --out artifacts/demo/tokenizer
  $SODA prepare --input data/tiny/manifest.jsonl --input data/tiny/text --output $DATA \
    --tokenizer artifacts/demo/tokenizer --codec random:0 --seq-len 256 --files-per-shard 32 --no-progress
fi
# Tiny 1-layer models whose compute is mostly the 17k-id LM head: FLOPs are counted as the paper does
# (with the head and attention), else the smallest width always wins. The grid moves with the budget
# (as the paper's does): widths 6-16 for the two small budgets, 8-24 for the largest.
COMMON=(--head-dim 8 --seq-len 256 --global-batch 4 --micro-batch 2 --vocab 16974)
RUN=(--base-config configs/tiny.yaml --nproc 1 --device cpu --data.paths "[$DATA]" --data.val_paths "[$DATA]"
  --data.num_workers 0 --train.eval_batches 16 --train.log_interval 50 --checkpoint.keep_last 1)
$SODA isoflop plan --budgets 1.25e11,2.5e11 --widths 6,8,12,16 "${COMMON[@]}" --out $OUT/plan-small
$SODA isoflop plan --budgets 5e11 --widths 8,12,16,24 "${COMMON[@]}" --out $OUT/plan-large
OMP_NUM_THREADS=1 $SODA isoflop run --plan $OUT/plan-small --out $OUT/small "${RUN[@]}"
OMP_NUM_THREADS=1 $SODA isoflop run --plan $OUT/plan-large --out $OUT/large "${RUN[@]}"
{ cat $OUT/small/runs.csv; tail -n +2 $OUT/large/runs.csv; } > $OUT/runs.csv
$SODA isoflop fit --csv $OUT/runs.csv --out docs/isoflop --bootstrap 500 --predict 1.0e12
