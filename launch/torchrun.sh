#!/usr/bin/env bash
# Single node: launch/torchrun.sh NPROC --config configs/soda-600m.yaml [--section.key value ...]
# = `soda train --nproc NPROC ...` (torchrun with the signals forwarded that the ranks save on, from
# megatron_soda/parallel/processes.py; CPU-only machines get the CPU backend with --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC --config CONFIG [overrides...]}
shift
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m megatron_soda.cli train --nproc "$NPROC" "$@"
