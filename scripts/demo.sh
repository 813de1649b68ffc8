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
head -n 28 data/tiny-s2st/s2st.jsonl > data/tiny-s2st/train.jsonl     # 28 pairs to learn from,
tail -n 4 data/tiny-s2st/s2st.jsonl > data/tiny-s2st/heldout.jsonl    # 4 never seen: the judge
for split in train heldout; do
  $SODA prepare --input data/tiny-s2st/$split.jsonl --output $OUT/s2st-$split --tokenizer $OUT/tokenizer \
    --codec random:0 --seq-len 256 --formats s2st,s2st_direct --no-progress > /dev/null
done
if ! grep -qs val_loss_start $OUT/s2st-ft.summary.json; then  # a finished run is not redone on a re-run
  $SODA finetune --init-from $OUT/run --config configs/finetune-tiny.yaml --run-dir $OUT/s2st-ft --device cpu \
    --data.paths "[$OUT/s2st-train]" --data.val_paths "[$OUT/s2st-heldout]" --train.eval_interval 30 \
    | tee $OUT/s2st-ft.summary.json
fi
# a pair it trained on and a held-out one; codec and tokenizer: the ones its training shards recorded
$SODA generate $OUT/s2st-ft --task s2st --audio data/tiny-s2st/audio/fr_0000.wav data/tiny-s2st/audio/fr_0030.wav \
  --max-seconds 3 --out $OUT/s2st-gen | tee $OUT/s2st-gen.jsonl

echo
echo "== what to judge"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
lines = open(f"{out}/s2st-ft.summary.json").read().splitlines()
summary = json.loads([x for x in lines if x.startswith('{"summary"')][-1])["summary"]
before = summary.get("val_loss_start")  # absent when the run was resumed: see its metrics.jsonl
print("held-out S2ST target loss (4 pairs never trained on): "
      + (f"{before:.3f} before fine-tuning, " if before is not None else "")
      + f"{summary['val_loss_last']:.3f} after {summary['step']} steps")
pairs = {json.loads(x)["source_audio"]: json.loads(x) for x in open("data/tiny-s2st/s2st.jsonl")}
sources = ["audio/fr_0000.wav", "audio/fr_0030.wav"]
for g in [json.loads(x) for x in open(f"{out}/s2st-gen.jsonl") if x.startswith("{")]:
    pair = pairs[sources[g["prompt"]]]
    seen = "trained on" if int(pair["id"][4:]) < 28 else "held out"
    audio = f"{g['seconds']:.1f} s of speech in {g['wav']}" if g.get("wav") else "no speech (it stopped at once)"
    print(f"{pair['id']} ({seen}): wanted {pair['target_text']!r}; got text {g['text']!r}, {audio}")
print("(a 2M-parameter model after 60 CPU steps, random-weight codec: judge the numbers, not the sound)")
PY

echo
echo "checkpoints: $OUT/run/checkpoints (latest: $(cat $OUT/run/checkpoints/latest))"
echo "TensorBoard: .venv/bin/tensorboard --logdir $OUT/run/tensorboard; metrics: $OUT/run/metrics.jsonl"
echo "(run again to resume: it continues from the latest checkpoint; delete $OUT/run to start over)"
