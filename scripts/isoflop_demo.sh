#!/usr/bin/env bash
# `make isoflop-demo`: an end-to-end IsoFLOP mini study on CPU (3 budgets x 4 widths of the tiny
# family, trained on the bundled corpus), fitted and plotted into docs/isoflop/. Takes minutes.
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
$SODA isoflop plan --budgets "${BUDGETS:-5e9,1e10,2e10}" --widths "${WIDTHS:-24,32,48,64}" --head-dim 16 \
  --seq-len 256 --global-batch 4 --micro-batch 2 --out $OUT/plan
$SODA isoflop run --plan $OUT/plan --base-config configs/tiny.yaml --out $OUT --nproc 1 \
  --device cpu --data.paths "[$DATA]" --data.val_paths "[$DATA]" --data.num_workers 0 --train.eval_batches 4 \
  --train.log_interval 10 --checkpoint.keep_last 1
$SODA isoflop fit --csv $OUT/runs.csv --out docs/isoflop --bootstrap 500 --predict 1.0e12
