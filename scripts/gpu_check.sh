#!/usr/bin/env bash
# What only a GPU can show, in one command: the Triton kernels compiled for real (parity + speed/
# memory vs megatron-core), the CUDA path of megatron-core training (bf16) with tokens/s, MFU and
# peak memory of the presets next to transformers' Qwen3 on the same GPU, and Mimi's encoding speed.
# Usage (repo root, a venv or system python with torch + CUDA):
#   scripts/gpu_check.sh [PRESETS="135m 600m 1.7b 4b"] [STEPS=10]
# Results: bench/results/train.jsonl + train.png, printed tables; copy them into docs/PERFORMANCE.md.
# On the lent device machines, megatron-core and webdataset come as wheels in .whl/ (see
# docs/PERFORMANCE.md); this script installs them to /tmp/site when .whl/ exists.
set -uo pipefail
cd "$(dirname "$0")/.."
PRESETS=${1:-"135m 600m 1.7b 4b"}
STEPS=${2:-10}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
SODA="python3 -m megatron_soda.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== Triton kernels compiled for this GPU: parity (fp32, then bf16) and speed/memory vs megatron-core"
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kernels.selfcheck
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kernels.selfcheck --bf16
$SODA bench kernels --hidden 576,1024,2048,2560 --tokens 8192,32768 --reps 10 --json bench/results/kernels.json
echo "== training throughput at seq 4096: ours (kernels), ours (torch embedding/CE), transformers Qwen3"
for p in $PRESETS; do
  case $p in  # micro-batch that fits one 80 GB GPU with the transformers baseline beside it
    135m) MB=4; EXTRA="" ;;
    600m) MB=2; EXTRA="" ;;
    1.7b) MB=1; EXTRA="" ;;
    4b) MB=1; EXTRA="--parallel.recompute full" ;;
  esac
  # shellcheck disable=SC2086
  $SODA bench train --config "configs/soda-$p.yaml" --device cuda --steps "$STEPS" --warmup 3 \
    --train.seq_length 4096 --train.micro_batch_size $MB --train.global_batch_size $((MB * 4)) $EXTRA \
    --variants ours,ours-nokernels,hf --label "soda-$p mb$MB s4096" \
    || echo "!! soda-$p did not complete (out of memory? see above)"
done
echo "== Mimi encoding (random weights, the real architecture and compute)"
$SODA bench tokenize --codec random:0 --device cuda --batch 1,8,32,64 --seconds 10 --json bench/results/tokenize.json
