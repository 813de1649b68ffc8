#!/usr/bin/env bash
# Single node: launch/torchrun.sh NPROC --config configs/soda-600m.yaml [--section.key value ...]
# (the same as `soda train --nproc NPROC ...`; CPU-only machines get --device cpu automatically).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: launch/torchrun.sh NPROC --config CONFIG [overrides...]}
shift
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# forward SLURM's USR1 to the ranks too (they save and stop); torch >= 2.8 reads PET_, older TORCHELASTIC_
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-$PET_SIGNALS_TO_HANDLE}
# megatron_soda.training.torchrun: torchrun, ending on one line instead of a traceback
exec "$PY" -m megatron_soda.training.torchrun --standalone --nproc-per-node "$NPROC" -m megatron_soda.training "$@"
