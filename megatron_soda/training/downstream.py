"""Downstream scores during training: the likelihood tasks (likelihood.py), scored by the training
ranks with the megatron model itself (any TP / PP / CP / DP layout: no export, no second copy of the
weights).

`DownstreamEval` is the loop's part: rank 0 reads and checks every task file and turns its items
into token ids (text through the tokenizer copy the training shards carry, audio through the codec
they recorded) before any step, and broadcasts them, so every rank scores the same ids and a bad
file is one line on every rank. Each evaluation then runs all tasks' sequences in one forward-only
pass of the Trainer's schedule (items split over DP ranks) and gathers the sums on every rank.
Generation tasks (ASR, TTS, S2ST) are `soda eval`'s alone: they are refused here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron_soda.config import ConfigError, SodaConfig, UserError
from megatron_soda.training.likelihood import (
    GENERATION_TASKS,
    LIKELIHOOD_TASKS,
    Candidate,
    EvalDataError,
    Request,
    TaskTokens,
    flat_metrics,
    read_task_file,
    requests,
    scored,
)


def _forward_step(cfg: SodaConfig, device: str, output_impl: str):
    """megatron's forward_step_func for scoring: the training forward (make_forward_step's, CP split
    included), whose loss function returns each sequence's summed NLL over its masked tokens (the
    vocab-parallel loss has reduced over TP already)."""
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_soda.model.gpt import local_vocab_range, output_weight
    from megatron_soda.model.loss import output_losses

    vocab_start, _ = local_vocab_range(cfg.model)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens).contiguous()
        local = get_batch_on_this_cp_rank(
            {
                "tokens": tokens,
                "labels": batch["labels"].to(device, non_blocking=True),
                "loss_mask": batch["loss_mask"].to(device, non_blocking=True),
                "positions": positions,
            }
        )
        output = model(local["tokens"], local["positions"], None)
        labels, mask = local["labels"], local["loss_mask"]

        def loss_func(output):
            nll, _, _ = output_losses(
                output,
                labels,
                mask,
                0.0,
                cfg.model,
                vocab_start,
                lambda: output_weight(model),
                cfg.parallel.sequence_parallel,
                impl=output_impl,
            )
            sums = (nll.detach().double() * mask.double()).sum(dim=1)  # [micro-batch]
            return sums.sum(), mask.sum().to(torch.int), {"sums": sums}

        return output, loss_func

    return forward_step


class MegatronLogProbs:
    """Log-prob sums from the Trainer's own model: requests in rows of `train.seq_length` tokens
    (right-padded with EOS, loss mask 1 on the continuation only: one request per row, as rows
    without document masking must not share one), micro-batches of `train.micro_batch_size`, split
    over DP ranks in contiguous blocks, run through the Trainer's forward-only schedule; the
    per-sequence sums leave the last pipeline stage summed over CP, then go to every rank (summed
    over PP, where only the last stage holds them, and all-gathered over DP)."""

    def __init__(self, cfg: SodaConfig, trainer) -> None:
        t = cfg.train
        self.trainer, self.seq, self.mbs, self.eos = trainer, t.seq_length, t.micro_batch_size, trainer.layout.eos_id
        self.pp_multiple = cfg.parallel.pp if cfg.parallel.vpp > 1 else 1  # the interleaved schedule's condition
        self.forward_step = _forward_step(cfg, trainer.device, trainer.fast_paths.output)

    def logprob_sums(self, requests: list[Request]) -> list[float]:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        tr = self.trainer
        if not requests:
            return []
        for context, cont in requests:
            if len(context) + len(cont) - 1 > self.seq:
                raise EvalDataError(
                    f"a sequence of {len(context) + len(cont)} tokens does not fit train.seq_length {self.seq} + 1"
                )
        micro_per_rank = math.ceil(len(requests) / (tr.dp * self.mbs))
        micro_per_rank = math.ceil(micro_per_rank / self.pp_multiple) * self.pp_multiple
        rows = micro_per_rank * self.mbs
        mine = requests[tr.dp_rank * rows : (tr.dp_rank + 1) * rows]
        tokens = torch.full((rows, self.seq + 1), self.eos, dtype=torch.long)
        mask = torch.zeros(rows, self.seq, dtype=torch.float32)
        for i, (context, cont) in enumerate(mine):
            seq = [*context, *cont]
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, len(context) - 1 : len(seq) - 1] = 1.0  # label t is token t + 1
        micro = [
            {
                "tokens": tokens[j : j + self.mbs, :-1].contiguous(),
                "labels": tokens[j : j + self.mbs, 1:].contiguous(),
                "loss_mask": mask[j : j + self.mbs].contiguous(),
            }
            for j in range(0, rows, self.mbs)
        ]
        for c in tr.chunks:
            c.eval()
        try:
            with torch.no_grad():
                outputs = tr._run(micro, self.forward_step, True)
        finally:
            for c in tr.chunks:
                c.train()
        local = torch.zeros(rows, dtype=torch.float64, device=tr.device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
            local += torch.cat([o["sums"] for o in outputs]).to(local)
        if ps.get_context_parallel_world_size() > 1:
            dist.all_reduce(local, group=ps.get_context_parallel_group())
        dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
        every = [torch.zeros_like(local) for _ in range(tr.dp)]
        dist.all_gather(every, local, group=ps.get_data_parallel_group())
        nll = torch.cat(every)[: len(requests)]
        return [-x for x in nll.tolist()]


# --- the loop's part ------------------------------------------------------------------------------


@dataclass
class PreparedTask:
    """A task file made ready on rank 0 and sent to every rank: its items and their candidates as ids."""

    name: str  # KIND:FILE, as soda eval's report names it
    kind: str
    items: list[dict]
    groups: list[list[Candidate]]


def parse_task_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`eval.tasks` -> (kind, path); only likelihood tasks, each name once."""
    out, names = [], set()
    for i, spec in enumerate(specs):
        kind, sep, path = spec.partition(":")
        where = f"eval.tasks[{i}] {spec!r}"
        if not sep or not path:
            raise ConfigError(f"{where}: expected KIND:FILE.jsonl")
        if kind in GENERATION_TASKS:
            raise ConfigError(
                f"{where}: {kind} samples speech or text, which the training ranks do not; score it with "
                "`soda eval` on an export (in-run: " + ", ".join(LIKELIHOOD_TASKS) + ")"
            )
        if kind not in LIKELIHOOD_TASKS:
            raise ConfigError(f"{where}: expected one of {', '.join(LIKELIHOOD_TASKS)}")
        name = f"{kind}:{Path(path).name}"
        if name in names:
            raise ConfigError(f"{where}: a second task named {name} (its metrics would overwrite the first's)")
        names.add(name)
        out.append((kind, path))
    return out


def training_tokenizer(cfg: SodaConfig, layout) -> tuple[object, str | None]:
    """The tokenizer copy the training shards carry and the codec they recorded, as `soda export-hf`
    hands them to `soda eval` (so both score the same ids)."""
    from megatron_soda.tokenization.shard_format import read_index
    from megatron_soda.tokenization.text_tokenizer import layout_of, load_tokenizer

    for p in cfg.data.paths:
        index = read_index(p, cfg.data.cache_dir)
        rel = (index.meta.get("tokenizer") or {}).get("path")
        if not rel:
            continue
        folder = index.root / rel
        if index.source and not folder.is_dir():  # a set on object storage: its tokenizer into the mirror
            from megatron_soda.tokenization.object_store import download_dir, join

            download_dir(join(index.source, rel), folder)
        if (folder / "tokenizer.json").is_file():
            tok = load_tokenizer(str(folder))
            layout.check_same(layout_of(tok, layout.codebooks, layout.codebook_size), f"tokenizer {folder}")
            return tok, (index.meta.get("codec") or {}).get("name")
    raise EvalDataError(
        "eval.tasks: none of data.paths carries its tokenizer (the `tokenizer` folder `soda prepare` writes)"
    )


def _audio_refs(x) -> list[str]:
    """The audio paths a likelihood item names (its candidates and prompt)."""
    if isinstance(x, dict):
        own = [x["audio"]] if isinstance(x.get("audio"), str) else []
        return own + [r for k, v in x.items() if k != "audio" for r in _audio_refs(v)]
    return [r for v in x for r in _audio_refs(v)] if isinstance(x, list) else []


def prepare_tasks(cfg: SodaConfig, layout, device: str) -> list[PreparedTask]:
    """Every task file read and checked, its items (the first `eval.max_items`) tokenized, audio
    encoded; a sequence longer than `train.seq_length` + 1 is refused here."""
    from megatron_soda.tokenization.codec import MIMI_HF_NAME, MimiCodec

    specs = parse_task_specs(cfg.eval.tasks)
    files = [(kind, path, read_task_file(path, LIKELIHOOD_TASKS[kind].check)) for kind, path in specs]
    limit = cfg.eval.max_items or None
    audio = False
    for _, path, items in files:  # every clip there before a codec loads (seconds to a minute)
        for n, it in enumerate(items[:limit]):
            for rel in _audio_refs(it):
                if not (Path(path).parent / rel).is_file():
                    raise EvalDataError(f"{path}: item {n}: {Path(path).parent / rel}: no such audio file")
                audio = True
    tok, codec_name = training_tokenizer(cfg, layout)
    codec = MimiCodec.load(codec_name or MIMI_HF_NAME, device, num_codebooks=layout.codebooks) if audio else None
    out, by_folder = [], {}  # one TaskTokens per folder: a clip two task files name is encoded once
    for kind, path, items in files:
        name = f"{kind}:{Path(path).name}"
        items = items[:limit]
        sc = by_folder.setdefault(Path(path).parent, TaskTokens(tok, layout, codec, Path(path).parent))
        groups = LIKELIHOOD_TASKS[kind].candidates(sc, items, name)
        for n, g in enumerate(groups):
            longest = max(len(c.context) + len(c.continuation) for c in g)
            if longest - 1 > cfg.train.seq_length:
                raise EvalDataError(
                    f"{path}: item {n} is {longest} tokens, more than train.seq_length {cfg.train.seq_length} + 1"
                )
        out.append(PreparedTask(name, kind, items, groups))
    return out


class DownstreamEval:
    """`eval.tasks` scored every `eval.interval` steps by the training ranks (every rank calls
    `run` at the same steps and gets the same metrics)."""

    def __init__(self, cfg: SodaConfig, trainer, layout) -> None:
        e = cfg.eval
        self.trainer, self.interval = trainer, e.interval
        self.enabled = bool(e.interval > 0 and e.tasks)
        self.tasks: list[PreparedTask] = []
        self.reports: dict[str, dict] = {}  # the last evaluation, per task, as soda eval reports it
        self.last: dict[str, float] = {}  # ... and as the step row's scalars
        if e.interval < 0 or e.max_items < 0:
            raise ConfigError(f"eval.interval and eval.max_items must be >= 0, got {e.interval} and {e.max_items}")
        if e.interval > 0 and not e.tasks:
            raise ConfigError(f"eval.interval {e.interval} but no eval.tasks: give KIND:FILE.jsonl task files")
        if not self.enabled:
            for kind, path in parse_task_specs(e.tasks):  # never scored, but a typo is still said now
                read_task_file(path, LIKELIHOOD_TASKS[kind].check)
            return
        self.tasks = _from_rank0(lambda: prepare_tasks(cfg, layout, trainer.device), trainer.device)
        self.logprobs = MegatronLogProbs(cfg, trainer)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.interval == 0

    def run(self) -> dict[str, float]:
        """Every task's metrics, flat (`flat_metrics`), with `eval/time_s` (how long it took)."""
        if not self.enabled:
            return {}
        t0 = time.perf_counter()
        groups = [g for t in self.tasks for g in t.groups]
        res = iter(scored(groups, self.logprobs.logprob_sums(requests(groups))))
        self.reports, self.last = {}, {}
        for t in self.tasks:
            report = LIKELIHOOD_TASKS[t.kind].metrics(t.items, [next(res) for _ in t.groups])
            self.reports[t.name] = report
            self.last.update(flat_metrics(t.name, report))
        self.last["eval/time_s"] = time.perf_counter() - t0
        return dict(self.last)


def _from_rank0(make: Callable[[], object], device: str):
    """`make()` on rank 0 (its RNG state kept: a random-weight codec seeds torch), sent to every
    rank; an error it raises is raised on every rank (a UserError as the same one line)."""
    import torch
    import torch.distributed as dist

    box: list = [None]
    error = None
    if dist.get_rank() == 0:
        devices = [torch.cuda.current_device()] if device == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                box[0] = ("ok", make())
        except UserError as e:
            box[0], error = ("user", str(e)), e
        except BaseException as e:
            box[0], error = ("bug", f"{type(e).__name__}: {e}"), e
        if device == "cuda":
            torch.cuda.empty_cache()  # the codec's memory back to the training
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if error is not None:
        raise error
    if status == "user":
        raise EvalDataError(value)
    if status == "bug":
        raise RuntimeError(f"rank 0 failed preparing the downstream tasks: {value}")
    return value
