#!/usr/bin/env bash
# `make demo`: the main job end to end on the bundled tiny corpus, on CPU.
# Every step is resumable, so a second run only redoes what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
SODA=.venv/bin/soda
OUT=artifacts/demo

echo "== 1. tiny corpus: espeak-ng speech of generated sentences, several voices"
$SODA corpus --out data/tiny --utterances 160 --text-docs 16

echo "== 2. SODA tokenizer: a small BPE trained here + 4 delimiters + 8 x 2048 audio tokens"
[ -f $OUT/tokenizer/tokenizer.json ] || $SODA tokenizer --train-tiny data/tiny/sentences.txt --out $OUT/tokenizer

echo "== 3. tokenize to shards: Mimi (random weights: no downloads here) + interleaving + packing"
$SODA prepare --input data/tiny/manifest.jsonl --input data/tiny/text --output $OUT/shards \
  --tokenizer $OUT/tokenizer --codec random:0 --seq-len 1024 --files-per-shard 32

echo "== 4. decode a few samples back"
$SODA inspect $OUT/shards --samples 3 --chars 400
echo
echo "shards: $OUT/shards (index.json, skipped.jsonl); loader speed: .venv/bin/soda bench loader"
