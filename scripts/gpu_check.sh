#!/usr/bin/env bash
# What only a GPU can show, in one command: the Triton kernels compiled for real (parity in fp32 and
# bf16, speed/memory vs torch, megatron-core, Liger-Kernel, cut-cross-entropy), the CUDA path of
# megatron-core training (bf16) with tokens/s, MFU, the step split and peak memory of the presets
# next to transformers' Qwen3, the speed levers' ablation, and Mimi's encoding speed.
#
# Usage (repo root; a venv or system python with torch + CUDA):
#   scripts/gpu_check.sh <part> [<part> ...]
# Parts, in the order they are worth a lease:
#   smoke     ~2 min: kernel selfchecks (fp32, bf16), a 135M step with every lever on next to all off
#   perf      ~8.5 min: bf16 selfcheck, 30-step bf16 loss comparison all-on vs all-off (135M), the
#             135M and 1.7B headline rows next to transformers, the 135M lever ablation, the kernel bench
#   perf2     ~9 min: 600M headline, 1.7B ablation, 4B (needs an H200: 18 B/param = 78.7 GB before activations)
#   perf3     ~9 min (not yet run): selfchecks with the new kernels, the fair CE race (incl. the blockwise
#             output layer), 135M / 1.7B / 600M / 4B headline rows, the 135M ablation, FP8 vs bf16 at 1.7B
#             and blockwise (exact, filtered) vs fused at 135M over 100 steps
#   long      ~5 min: long context on one GPU (CP=1): 135M at 8k / 16k / 32k tokens, 600M at 32k
#             (configs/soda-600m-32k.yaml): tokens/s, both MFU conventions, peak memory
#   generate  ~3 min: soda generate's tokens/s at batch 1 and 64 (600M, bf16, SDPA)
#   kernels   the kernel bench alone;  train  the presets in $PRESETS;  tokenize  Mimi encoding
# Env: PRESETS (train part), STEPS (measured steps), ACCUM (micro-batches per step), VARIANTS, SEQ (tokens),
#   PROFILE=DIR (torch.profiler trace + top operators per variant), STEP_TIMEOUT (s per command).
# Every command runs under `timeout` so one stuck part cannot eat a lease, and every result is
# copied to $OUT as soon as it exists (the device machines bring back only what is there).
# Results: bench/results/{train.jsonl,train.png,kernels.json,tokenize.json,selfcheck_*.jsonl,log}.
# On the lent device machines megatron-core, webdataset, Liger-Kernel and cut-cross-entropy come as
# wheels in .whl/ (docs/PERFORMANCE.md says how); this script installs them to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=${*:-smoke}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
SODA="python3 -m megatron_soda.cli"
R=bench/results
mkdir -p $R
T0=$SECONDS
save() { if [ -n "${OUT:-}" ]; then cp $R/* "$OUT"/ 2>/dev/null; fi; }
run() {  # run <what> <seconds> <command...>: bounded in time, a failure reported and the script goes on
  local what=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $what (at $((SECONDS - T0)) s)"
  timeout "$limit" "$@" || echo "!! $what failed or timed out (rc $?)"
  echo "-- $what: $((SECONDS - t0)) s"
  save
}
selfchecks() {
  for dt in fp32 bf16; do
    run "selfcheck $dt" 120 bash -c "python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_soda.kernels.selfcheck \
      $([ $dt = bf16 ] && echo --bf16) | tee $R/selfcheck_$dt.jsonl"
  done
}
bench() {  # bench <preset> <micro> <accum> <steps> <warmup> <variants> <seconds> [overrides...]
  local p=$1 mb=$2 acc=$3 steps=$4 warm=$5 variants=$6 limit=$7; shift 7
  run "bench train soda-$p [$variants]" "$limit" $SODA bench train --config "configs/soda-$p.yaml" --device cuda \
    --steps "$steps" --warmup "$warm" --train.seq_length "${SEQ:-4096}" --train.micro_batch_size "$mb" \
    --train.global_batch_size $((mb * acc)) --variants "$variants" --label "soda-$p mb$mb x$acc s${SEQ:-4096}" \
    --results $R/train.jsonl --plot $R/train.png ${PROFILE:+--profile "$PROFILE/$p"} "$@"
}
ABLATION=ours-off+graphs,ours-off+wgrad,ours-off+norm,ours-off+rope,ours-off+adam
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"
for part in $PARTS; do
  case $part in
  smoke)
    run "selfcheck bf16" 120 bash -c "python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_soda.kernels.selfcheck --bf16 | tee $R/selfcheck_bf16.jsonl"
    bench 135m 8 2 3 3 ours-off,ours 240 --train.steps 6 --baseline-micro-batch 2
    run "bench kernels (one shape)" 120 $SODA bench kernels --hidden 2560 --tokens 8192 --reps 3 --json $R/kernels_smoke.json ;;
  perf)  # ~8.5 min on an H100, measured part by part on 2026-11-25 (each variant is its own process, ~30 s)
    run "selfcheck bf16" 120 bash -c "python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_soda.kernels.selfcheck --bf16 | tee $R/selfcheck_bf16.jsonl"
    # 30-step bf16 loss comparison, all levers on vs all off (the LR schedule spans those 30 steps)
    bench 135m 8 2 27 3 ours-off,ours 150 --train.steps 30
    bench 135m 8 2 3 2 hf 90 --baseline-micro-batch 2
    bench 1.7b 2 8 3 2 ours,ours-off,hf 200 --baseline-micro-batch 1
    # each lever alone; ours-off again with the same settings, so graphs-vs-eager losses compare
    bench 135m 8 2 5 3 "ours-off,$ABLATION" 200
    run "bench kernels" 110 $SODA bench kernels --hidden 576,2560 --tokens 8192,32768 --reps 3 --json $R/kernels.json ;;
  perf3)  # speed, third round (~9 min on an H200; the 4B row needs its memory): bf16 selfchecks with
    # the new kernels, the fair CE race, the headline rows, the 135M ablation, FP8 against bf16 at
    # 1.7B over 100 steps (same initial weights and batches: the loss curves compare step by step)
    run "selfcheck bf16" 120 bash -c "python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m megatron_soda.kernels.selfcheck --bf16 | tee $R/selfcheck_bf16.jsonl"
    run "bench kernels (race, norm)" 120 $SODA bench kernels --hidden 576,1024,2048,2560 --tokens 8192 --reps 3 \
      --ops race,norm --json $R/kernels_race.json
    bench 135m 8 2 3 2 ours,ours-off,hf 90 --baseline-micro-batch 2
    bench 1.7b 2 8 3 2 ours,hf 120 --baseline-micro-batch 1
    bench 135m 8 2 5 3 "ours-off,$ABLATION" 120
    bench 1.7b 2 1 100 3 ours,ours+fp8 120 --train.steps 103
    # the blockwise output layer, exact and with the gradient filter, against ours (fused): 135M over
    # 100 steps from the same weights and (synthetic, memorised) batches: tokens/s, and what filtering
    # does to the loss curve (the real-data comparison is the CPU run in docs/PERFORMANCE.md)
    bench 135m 8 1 100 3 ours,ours+blockwise,ours+filter 200 --train.steps 103
    bench 600m 4 4 3 2 ours 60
    bench 4b 1 8 3 2 ours 60 ;;
  perf2)  # the rest of issue 14's list (another ~9 min): 600M headline, 1.7B ablation, 4B on an H200
    bench 600m 4 4 3 2 ours,ours-off,hf 200 --baseline-micro-batch 2
    bench 1.7b 2 8 3 2 "ours-off,$ABLATION" 300
    bench 4b 1 8 3 2 ours,hf 200 ;;
  kernels)
    run "bench kernels" 300 $SODA bench kernels --hidden "${KERNEL_HIDDEN:-576,1024,2048,2560}" --tokens 8192,32768 \
      --reps 10 --json $R/kernels.json ;;
  train)
    for p in ${PRESETS:-135m 600m 1.7b 4b}; do
      case $p in  # micro-batch that fits one 80 GB GPU
        135m) MB=8 ;; 600m) MB=4 ;; 1.7b) MB=2 ;; 4b) MB=1 ;; *) echo "unknown preset $p"; continue ;;
      esac
      bench "$p" $MB "${ACCUM:-4}" "${STEPS:-10}" 3 "${VARIANTS:-ours,ours-nokernels,hf}" "$STEP_TIMEOUT"
    done ;;
  long)  # context lengths one lent GPU holds (CP layouts need more GPUs): rows as they come, <= 5 min
    for s in 8192 16384 32768; do
      SEQ=$s bench 135m 1 2 3 2 ours 60
    done
    SEQ=32768 bench 600m-32k 1 2 3 2 ours 120 ;;
  generate)  # soda generate's sampling loop (transformers + KV cache, bf16, SDPA): 600M at batch 1 and 64
    run "bench generate soda-600m" 240 $SODA bench generate --config configs/soda-600m.yaml --device cuda \
      --batch 1,64 --new-tokens 256 --prompt-tokens 256 --json $R/generate.jsonl ;;
  tokenize)
    run "bench tokenize" "$STEP_TIMEOUT" $SODA bench tokenize --codec random:0 --device cuda --batch 1,8,32,64 \
      --seconds 10 --json $R/tokenize.json ;;
  *) echo "unknown part $part (smoke, perf, perf2, perf3, long, generate, kernels, train, tokenize)" ;;
  esac
done
echo "gpu_check done in $((SECONDS - T0)) s"
save
