#!/usr/bin/env bash
# What only a GPU can show, in one command: the Triton kernels compiled for real (parity + speed/
# memory vs megatron-core), the CUDA path of megatron-core training (bf16) with tokens/s, MFU and
# peak memory of the presets next to transformers' Qwen3 on the same GPU, and Mimi's encoding speed.
# Usage (repo root, a venv or system python with torch + CUDA):
#   scripts/gpu_check.sh [PRESETS="135m 600m 1.7b 4b"] [STEPS=10] [PARTS="kernels train tokenize"]
# Env: ACCUM micro-batches per optimizer step (default 4), VARIANTS (default ours,ours-nokernels,hf),
# PROFILE=DIR adds a torch.profiler trace per variant (top operators printed). Every part runs under
# `timeout $STEP_TIMEOUT` (default 300 s) so one stuck part cannot eat a lease.
# Results: bench/results/{train.jsonl,train.png,kernels.json,tokenize.json} and printed tables
# (copied to $OUT when set, as on the lent device machines); copy them into docs/PERFORMANCE.md.
# On the lent device machines, megatron-core and webdataset come as wheels in .whl/ (see
# docs/PERFORMANCE.md); this script installs them to /tmp/site when .whl/ exists.
set -uo pipefail
cd "$(dirname "$0")/.."
PRESETS=${1:-"135m 600m 1.7b 4b"}
STEPS=${2:-10}
PARTS=${3:-"kernels train tokenize"}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
SODA="python3 -m megatron_soda.cli"
mkdir -p bench/results
run() {  # run <what> <command...>: bounded in time, a failure reported and the script goes on
  local what=$1; shift
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" || echo "!! $what failed or timed out (rc $?)"
  echo "-- $what: $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)"
for part in $PARTS; do
  case $part in
  kernels)
    echo "== Triton kernels compiled for this GPU: parity (fp32, then bf16) and speed/memory vs megatron-core"
    run "selfcheck fp32" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kernels.selfcheck
    run "selfcheck bf16" python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kernels.selfcheck --bf16
    run "bench kernels" $SODA bench kernels --hidden "${KERNEL_HIDDEN:-576,1024,2048,2560}" --tokens 8192,32768 --reps 10 \
      --json bench/results/kernels.json ;;
  train)
    echo "== training throughput at seq 4096: ours (kernels), ours (torch embedding/CE), transformers Qwen3"
    for p in $PRESETS; do
      case $p in  # micro-batch that fits one 80 GB GPU with the transformers baseline beside it
        135m) MB=2; EXTRA="" ;;  # mb 4 fits ours (fused CE) but not the unfused output layer
        600m) MB=2; EXTRA="" ;;
        1.7b) MB=1; EXTRA="" ;;
        4b) MB=1; EXTRA="--parallel.recompute full" ;;  # AdamW states alone: 18 B/param = 72 GB
        *) echo "unknown preset $p"; continue ;;
      esac
      # shellcheck disable=SC2086
      run "bench train soda-$p" $SODA bench train --config "configs/soda-$p.yaml" --device cuda --steps "$STEPS" \
        --warmup 3 --train.seq_length 4096 --train.micro_batch_size $MB --train.global_batch_size $((MB * ${ACCUM:-4})) \
        $EXTRA ${PROFILE:+--profile "$PROFILE/$p"} --variants ${VARIANTS:-ours,ours-nokernels,hf} --label "soda-$p mb$MB x${ACCUM:-4} s4096"
    done ;;
  tokenize)
    echo "== Mimi encoding (random weights, the real architecture and compute)"
    run "bench tokenize" $SODA bench tokenize --codec random:0 --device cuda --batch 1,8,32,64 --seconds 10 \
      --json bench/results/tokenize.json ;;
  esac
done
if [ -n "${OUT:-}" ]; then cp bench/results/* "$OUT"/ 2>/dev/null; fi
