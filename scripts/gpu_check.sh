#!/usr/bin/env bash
# What only a GPU can show, in one command: the CUDA path of megatron-core training (bf16, local or
# TE spec), and its tokens/s and MFU on a synthetic shard set, plus Mimi tokenization speed.
# Usage (repo root, a venv or system python with torch + CUDA):
#   scripts/gpu_check.sh [PRESET=configs/soda-135m.yaml] [STEPS=20]
# On the lent device machines, megatron-core and webdataset come as wheels in .whl/ (see
# docs/PERFORMANCE.md); this script installs them to /tmp/site when .whl/ exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-configs/soda-135m.yaml}
STEPS=${2:-20}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== Triton kernels compiled for this GPU: parity (fp32, then bf16) and speed/memory vs megatron-core"
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kernels.selfcheck
python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m kernels.selfcheck --bf16
python3 -m megatron_soda.cli bench kernels --hidden 576,1024,2048,2560 --tokens 8192,32768 --reps 10
python3 - <<'PY'
import json, tempfile
from pathlib import Path
from megatron_soda.benchmarks.loader import synthetic_shards
out = Path("/tmp/soda_gpu_shards"); out.mkdir(exist_ok=True)
if not (out / "index.json").exists():
    synthetic_shards(out, num_shards=4, samples_per_shard=128, seq_len=4096)
print("synthetic shards:", out)
PY
rm -rf /tmp/soda_gpu_run
python3 -m megatron_soda.train --config "$PRESET" --device cuda --run-dir /tmp/soda_gpu_run \
  --data.paths "[/tmp/soda_gpu_shards]" --train.steps "$STEPS" --train.global_batch_size 8 \
  --train.micro_batch_size 2 --checkpoint.resume false --checkpoint.save_interval 0
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/soda_gpu_run/metrics.jsonl")]
tail = rows[len(rows) // 2:]
avg = lambda k: sum(r[k] for r in tail) / len(tail)
print(json.dumps({"tokens_per_s": avg("tokens_per_s"), "tflops_per_device": avg("tflops_per_device"),
                  "mfu": avg("mfu") if tail[0].get("mfu") is not None else None,
                  "memory_gb": max(r["memory_gb"] for r in rows), "loss_first": rows[0]["loss"],
                  "loss_last": rows[-1]["loss"]}, indent=1))
PY
