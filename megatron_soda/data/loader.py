"""This DP rank's share of each global batch of the mixture, and the position that checkpoints save.

The loader yields one step's work at a time: this rank's micro-batches of a global batch (it owns
the micro-batch count, `config.num_micro_batches`). Its whole state is one integer,
`consumed_samples`: step s uses global samples [s * global_batch, (s + 1) * global_batch), each DP
rank its contiguous slice, and DataLoader workers fetch whole micro-batches.

A mixture with a set on object storage also gets the rank's prefetcher (data/remote.py) for each
iteration: it walks its own copy of this order data.prefetch_steps steps ahead into the local
cache, so the order and consumed_samples are the same with or without it. Local sets start none.
"""

from __future__ import annotations

import functools
import logging
import os
import signal

import torch
from torch.utils.data import DataLoader

from megatron_soda.config import UserError, num_micro_batches
from megatron_soda.data.mixture import PAD, MixtureDataset
from megatron_soda.parallel.processes import die_with_parent

log = logging.getLogger("soda")

PREFETCH_FACTOR = 4  # micro-batches each DataLoader worker is asked for ahead of the consumer


def _collated(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # `__getitems__` already returns a batch


def split_batch(batch: dict[str, torch.Tensor], pad_input_id: int) -> dict[str, torch.Tensor]:
    """[B, seq_len + 1] samples -> model inputs, next-token labels and the loss mask.

    Padding never enters the loss; as an input position it reads `pad_input_id` (EOS), whose
    output is masked anyway. Prompt tokens (stored as -(id + 2)) are inputs but never labels.
    """
    sample = batch["sample"].long()
    valid = sample != PAD
    prompt = sample < PAD
    ids = torch.where(prompt, -sample - 2, sample)
    return {
        "tokens": torch.where(valid[:, :-1], ids[:, :-1], pad_input_id),
        "labels": torch.where(valid[:, 1:], ids[:, 1:], 0),
        "loss_mask": (valid[:, :-1] & valid[:, 1:] & ~prompt[:, 1:]).float(),
        "index": batch["index"],
        "corrupt": batch["corrupt"],
    }


# --- who reads what -----------------------------------------------------------------------------


class GlobalBatchSampler:
    """Micro-batches of global indices for one DP rank, from `consumed_samples` on (Megatron order)."""

    def __init__(
        self, consumed_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int
    ):
        num_micro_batches(global_batch_size, micro_batch_size, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.consumed = consumed_samples
        self.mbs, self.gbs, self.rank, self.dp = micro_batch_size, global_batch_size, dp_rank, dp_size

    def __iter__(self):
        per_rank = self.gbs // self.dp
        start = self.consumed
        while True:
            base = start + self.rank * per_rank
            for m in range(0, per_rank, self.mbs):
                yield list(range(base + m, base + m + self.mbs))
            start += self.gbs


def _worker_init(parent: int, worker_id: int) -> None:
    """Loader workers leave SIGTERM / SIGUSR1 / SIGINT to their rank: SLURM and `kill` signal every
    process of a job, and a worker dying of it would take the rank down ("DataLoader worker killed by
    signal") before it saves. They die with their rank instead: the rank shuts them down on every
    exit path (`SodaDataLoader.__iter__`), and the kernel kills them if the rank itself is killed."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent)


class DataStateError(UserError, ValueError):
    """A checkpoint's data position saved for other data than this run reads."""


class SodaDataLoader:
    """Iterates this rank's global batches (lists of micro-batches); `state_dict()` goes into every
    checkpoint."""

    def __init__(
        self,
        dataset: MixtureDataset,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int | None = None,
        consumed_samples: int = 0,
    ) -> None:
        self.dataset = dataset
        self.mbs, self.gbs, self.dp_rank, self.dp_size = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.num_workers = dataset.cfg.num_workers if num_workers is None else num_workers
        self.consumed_samples = consumed_samples
        self.corrupt_samples = 0
        self.num_micro = num_micro_batches(global_batch_size, micro_batch_size, dp_size)
        shape = GlobalBatchSampler(0, micro_batch_size, global_batch_size, dp_rank, dp_size)  # validates it now
        self.prefetched = 0  # samples the prefetcher fetched from object storage ahead of the loader
        self._prefetch = False
        if any(s.remote is not None for s in dataset.sets):  # local sets: nothing of this
            from megatron_soda.data.remote import prefetch_wanted

            self._prefetch = prefetch_wanted(dataset, shape, self._lead)  # a cache too small: refused now

    @property
    def _lead(self) -> int:
        """Samples of this rank the DataLoader's workers ask for ahead of the consumer (and fetch
        themselves): where the prefetcher's window begins."""
        return self.num_workers * PREFETCH_FACTOR * self.mbs

    def _start_prefetch(self):
        """The rank's prefetcher for an iteration from consumed_samples (None: no set on object
        storage, prefetch off, or one already running for this dataset)."""
        if not self._prefetch:
            return None
        from megatron_soda.data.remote import start_prefetch

        order = GlobalBatchSampler(self.consumed_samples, self.mbs, self.gbs, self.dp_rank, self.dp_size)
        return start_prefetch(self.dataset, order, lead=self._lead)

    def _stop_prefetch(self, prefetch) -> None:
        prefetch.close()  # no request of its runs after this
        self.prefetched += prefetch.fetched
        if self.dp_rank == 0 and prefetch.fetched:
            log.info(
                "data prefetcher: fetched %d samples from object storage ahead of the loader (%d were cached already)",
                prefetch.fetched,
                prefetch.found,
            )

    def __iter__(self):
        sampler = GlobalBatchSampler(self.consumed_samples, self.mbs, self.gbs, self.dp_rank, self.dp_size)
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            collate_fn=_collated,
            prefetch_factor=PREFETCH_FACTOR if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=functools.partial(_worker_init, os.getpid()),
        )
        batches = iter(loader)  # the workers are forked here: before the prefetcher's threads exist
        prefetch = None
        step: list[dict] = []
        try:
            prefetch = self._start_prefetch()
            for batch in batches:
                if prefetch is not None:
                    prefetch.advance(len(batch["index"]))  # raises what broke the prefetcher (a bug)
                self.corrupt_samples += int(batch["corrupt"].sum())
                step.append(split_batch(batch, self.dataset.pad_input))
                if len(step) == self.num_micro:
                    self.consumed_samples += self.gbs  # every DP rank has its share of this global batch
                    yield step
                    step = []
        finally:
            # on every way out (the loop closes this generator): the prefetcher, and the workers,
            # which ignore SIGTERM and would otherwise be left to multiprocessing's exit handler,
            # which SIGTERMs and joins them forever
            try:
                if prefetch is not None:
                    self._stop_prefetch(prefetch)
            finally:
                shutdown = getattr(batches, "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "fingerprint": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("fingerprint")
        if saved != self.dataset.fingerprint():
            if saved not in (self.dataset.fingerprint("records"), self.dataset.fingerprint("paths")):
                raise DataStateError(
                    "the checkpoint's data position was saved for other data (shard contents, codec, "
                    f"tokenizer, sets, weights, seed or block differ): checkpoint {saved} vs now "
                    f"{self.dataset.fingerprint()}; resume with the data it was trained on, or start a new run"
                )
            log.warning(
                "checkpoint from an earlier version: its data identity covers the shard records, not "
                "their contents or codec; resuming on these shards as the same data"
            )
        self.consumed_samples = int(state["consumed_samples"])
