"""Validation loss during training: the held-out shard sets' first `train.eval_batches` global
batches, always the same ones, so every validation of a run (and of a resumed run) is comparable."""

from __future__ import annotations

from megatron_soda.config import DataConfig, SodaConfig
from megatron_soda.data.loader import SodaDataLoader
from megatron_soda.data.mixture import MixtureDataset


class Validator:
    def __init__(self, cfg: SodaConfig, layout, trainer) -> None:
        t = cfg.train
        self.trainer, self.interval, self.batches = trainer, t.eval_interval, t.eval_batches
        self.enabled = bool(t.eval_interval and cfg.data.val_paths)
        self.data = None
        if self.enabled:
            d = cfg.data
            val = DataConfig(paths=d.val_paths, seed=d.seed, num_workers=0, skip_corrupt=d.skip_corrupt)
            self.data = MixtureDataset(val, layout=layout, seq_len=t.seq_length)
        self.shape = (t.micro_batch_size, t.global_batch_size)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def run(self) -> float:
        """Mean token NLL over the validation batches (every rank calls it; all get the same number)."""
        loader = SodaDataLoader(self.data, *self.shape, self.trainer.dp_rank, self.trainer.dp, num_workers=0)
        return self.trainer.evaluate(iter(loader), self.batches)
