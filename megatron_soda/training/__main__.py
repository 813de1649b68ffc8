"""`python -m megatron_soda.training ARGS` is `soda train ARGS` (what user-written torchrun / srun lines start)."""

import sys

from megatron_soda.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
