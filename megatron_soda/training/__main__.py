"""`python -m megatron_soda.training [--config ...]`: one training rank (what torchrun and srun start)."""

import sys

from megatron_soda.training.loop import main

sys.exit(main())
