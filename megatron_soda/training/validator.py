"""Validation loss during training: the held-out shard sets' first `train.eval_batches` global
batches, always the same ones, so every validation of a run (and of a resumed run) is comparable."""

from __future__ import annotations

from contextlib import closing

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
            val = DataConfig(
                paths=d.val_paths,
                seed=d.seed,
                num_workers=0,
                skip_corrupt=d.skip_corrupt,
                verify_checksums=d.verify_checksums,
                # sets on object storage: the training sets' cache and budget; a read-ahead of at
                # most as many steps as a validation reads
                cache_dir=d.cache_dir,
                cache_gb=d.cache_gb,
                prefetch_steps=min(d.prefetch_steps, t.eval_batches),
            )
            self.data = MixtureDataset(val, layout=layout, seq_len=t.seq_length)
        self.shape = (t.micro_batch_size, t.global_batch_size)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def run(self) -> dict:
        """`val_loss` (mean token NLL over the validation batches) and, for sequences longer than
        `train.position_bucket`, `val_loss_pos_<lo>_<hi>` per position range: whether late positions
        (much context) are predicted better than early ones. Every rank calls it and gets the same."""
        loader = SodaDataLoader(self.data, *self.shape, self.trainer.dp_rank, self.trainer.dp, num_workers=0)
        with closing(iter(loader)) as batches:  # its prefetcher (sets on object storage) stops here
            losses = self.trainer.evaluate(batches, self.batches)
        return {"val_loss": losses["loss"], **{f"val_{k}": v for k, v in losses.items() if k.startswith("loss_pos_")}}
