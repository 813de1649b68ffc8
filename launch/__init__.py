"""Launchers: SLURM (training with preemption-safe requeue, tokenization arrays) and single-node torchrun."""
