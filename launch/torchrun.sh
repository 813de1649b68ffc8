#!/usr/bin/env bash
# Single node: launch/torchrun.sh NPROC --config configs/soda-600m.yaml [--section.key value ...]
# (the same as `soda train --nproc NPROC ...`; CPU-only machines get --device cpu automatically).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC --config CONFIG [overrides...]}
shift
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_soda.training "$@"
