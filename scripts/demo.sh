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

echo
echo "== 5. train the tiny SODA model on CPU with TP=2 (megatron-core on gloo), 200 steps"
$SODA prepare --input data/tiny/manifest.jsonl --input data/tiny/text --output $OUT/shards-256 \
  --tokenizer $OUT/tokenizer --codec random:0 --seq-len 256 --files-per-shard 32 --no-progress > /dev/null
$SODA train --nproc 2 --config configs/tiny.yaml --device cpu --run-dir $OUT/run \
  --parallel.tp 2 --data.paths "[$OUT/shards-256]" --train.steps 200 --train.global_batch_size 4 \
  --train.eval_interval 50 --data.val_paths "[$OUT/shards-256]" --optim.lr 1e-2

echo
echo "== 6. the loss curve"
$SODA plot $OUT/run
echo
echo "== 7. export to Hugging Face (Qwen3ForCausalLM + the SODA tokenizer), verified against transformers"
$SODA export-hf $OUT/run $OUT/hf --verify --force

echo
echo "== 8. fine-tune for speech-to-speech translation (fr -> en, same voice) and generate"
$SODA corpus --s2st 32 --out data/tiny-s2st
$SODA prepare --input data/tiny-s2st/s2st.jsonl --output $OUT/shards-s2st --tokenizer $OUT/tokenizer \
  --codec random:0 --seq-len 256 --formats s2st,s2st_direct --no-progress > /dev/null
$SODA finetune --init-from $OUT/run --config configs/finetune-tiny.yaml --run-dir $OUT/s2st --device cpu \
  --data.paths "[$OUT/shards-s2st]" --data.val_paths "[$OUT/shards-s2st]" --train.eval_interval 30
$SODA generate $OUT/s2st --task s2st --audio data/tiny-s2st/audio/fr_0000.wav data/tiny-s2st/audio/fr_0001.wav \
  --max-seconds 3 --out $OUT/s2st-gen   # codec and tokenizer: the ones its training shards recorded

echo
echo "checkpoints: $OUT/run/checkpoints (latest: $(cat $OUT/run/checkpoints/latest))"
echo "TensorBoard: .venv/bin/tensorboard --logdir $OUT/run/tensorboard; metrics: $OUT/run/metrics.jsonl"
echo "(run again to resume: it continues from the latest checkpoint; delete $OUT/run to start over)"
