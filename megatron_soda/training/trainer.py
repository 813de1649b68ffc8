"""The Trainer: one rank's part of a training run, built from a resolved run config.

It owns the model chunks (megatron DDP, bf16 on GPU), the optimizer and LR schedule, and megatron's
forward-backward schedule (inside a CUDA graph when `parallel.cuda_graph` says so). `train_step`
turns one global batch's micro-batches into one optimizer step (or a skipped one, when a loss or
gradient is not finite); `evaluate` runs the same forward without gradients. `state_dict` /
`load_state_dict` are its non-tensor state, which the checkpointer saves beside the sharded model
and optimizer. The loop (loop.py) and `soda bench train` both drive this same step.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from megatron_soda.config import SodaConfig
from megatron_soda.model.fast_paths import FastPaths, install
from megatron_soda.model.init import layout_invariant_init
from megatron_soda.parallel.setup import synchronize
from megatron_soda.tokenization.vocab import SodaLayout
from megatron_soda.training.optimizer import build_optimizer, build_scheduler

log = logging.getLogger("soda")

# Eager steps before the graph is captured: the first compiles the Triton kernels, picks cuBLAS
# algorithms and the weight-gradient GEMM form; the capture then replays as the third step.
CUDA_GRAPH_WARMUP_STEPS = 2


class Trainer:
    def __init__(self, cfg: SodaConfig, device: str, fp: FastPaths, layout: SodaLayout, dp: int) -> None:
        """Call after `setup_parallel` (process groups, seeds), on every rank."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.transformer.module import Float16Module

        from megatron_soda.model.gpt import build_model

        self.cfg, self.device, self.fast_paths, self.layout, self.dp = cfg, device, fp, layout, dp
        cuda = device == "cuda"
        dtype = torch.bfloat16 if cuda else torch.float32
        installed = install(fp)
        self.modules, path = build_model(cfg.model, cfg.parallel, dtype, cuda, fp)
        if cfg.model.init == "layout_invariant":
            layout_invariant_init(self.modules, cfg.model.init_std, cfg.train.seed)
        if dist.get_rank() == 0:
            log.info("layers: %s; %s; %s", path, fp.describe(), "bf16" if cuda else "fp32 (CPU backend)")
            if installed:
                log.info("megatron-core fast-path hooks filled: %s", ", ".join(installed))
        config = self.config = self.modules[0].config
        compute = [Float16Module(config, m) if dtype == torch.bfloat16 else m for m in self.modules]
        p = cfg.parallel
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            use_distributed_optimizer=p.distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=m, disable_bucketing=i > 0)
            for i, m in enumerate(compute)
        ]
        self.optimizer = build_optimizer(cfg, self.chunks, dtype, fused_adam=fp.adam == "fused")
        self.scheduler = build_scheduler(cfg, self.optimizer)
        config.finalize_model_grads_func = finalize_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        if p.overlap_grad_reduce:
            sync = [c.start_grad_sync for c in self.chunks]
            config.grad_sync_func = sync if len(sync) > 1 else sync[0]
        self.eval_schedule = get_forward_backward_func()
        self.train_schedule = self.eval_schedule
        if fp.cuda_graph == "full_iteration":
            from megatron.core.full_cuda_graph import FullCudaGraphWrapper

            self.train_schedule = FullCudaGraphWrapper(
                self.eval_schedule, cuda_graph_warmup_steps=CUDA_GRAPH_WARMUP_STEPS
            )
        self.stats = StepStats(layout)
        self.forward_step = make_forward_step(cfg, layout, device, fp)
        self.nan_forward_step = make_forward_step(cfg, layout, device, fp, inject_nan=True)
        self.num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
        self.step = 0
        self.skipped_steps = 0

    # --- one step ---------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict], inject_nan: bool = False) -> dict:
        """One optimizer step over this rank's micro-batches of a global batch. Returns the step's
        losses (reduced over every rank), the LR it used, the grad norm, `skipped` (True when a
        non-finite loss or gradient left the weights unchanged) and its timing: fwd_bwd_s (megatron's schedule, gradient
        reduction included), optimizer_s, step_s."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        synchronize(self.device)
        t0 = time.perf_counter()
        outputs = self._run(micro_batches, self.nan_forward_step if inject_nan else self.forward_step, False)
        synchronize(self.device)
        t1 = time.perf_counter()
        row = self.stats.as_dict(self.stats.reduce(outputs, self.device))
        row["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        finite = math.isfinite(row["loss"]) and grads_finite(self.chunks)
        row["grad_norm"] = None
        if finite:
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        else:
            self.skipped_steps += 1
        row["skipped"] = not finite
        synchronize(self.device)
        t2 = time.perf_counter()
        self.step += 1
        row.update(fwd_bwd_s=t1 - t0, optimizer_s=t2 - t1, step_s=t2 - t0)
        return row

    def evaluate(self, batches, count: int) -> float:
        """Mean token NLL over `count` global batches drawn from the iterator `batches`."""
        for c in self.chunks:
            c.eval()
        total = None
        with torch.no_grad():
            for _ in range(count):
                micro = [next(batches) for _ in range(self.num_micro)]
                s = self.stats.reduce(self._run(micro, self.forward_step, True), self.device)
                total = s if total is None else total + s
        for c in self.chunks:
            c.train()
        return self.stats.as_dict(total)["loss"]

    def forward_only(self, micro_batches: list[dict]) -> None:
        """The forward of a training step without the backward (what `soda bench` subtracts)."""
        self._run(micro_batches, self.forward_step, True)

    def _run(self, micro: list[dict], forward_step, forward_only: bool) -> list[dict]:
        """One global batch through megatron's schedule (the training one, graphed when CUDA graphs
        are on; evaluation always eager)."""
        t = self.cfg.train
        data = [iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro)
        model = self.chunks if len(self.chunks) > 1 else self.chunks[0]
        schedule = self.eval_schedule if forward_only else self.train_schedule
        if getattr(schedule, "curr_iter", None) and schedule.curr_iter("training") == schedule.cuda_graph_warmup_steps:
            # the capture comes next: hand the eager steps' cached activation blocks back to the
            # device, else the graph's own memory pool comes on top of them (1.7B at micro-batch 2
            # ran out of memory)
            torch.cuda.empty_cache()
        return schedule(
            forward_step_func=forward_step,
            data_iterator=data,
            model=model,
            num_microbatches=len(micro),
            seq_length=t.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )

    # --- what a checkpoint keeps besides the sharded model and optimizer -------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.scheduler.load_state_dict(state["scheduler"])


def finalize_grads(model, num_tokens=None, pg_collection=None, force_all_reduce=False) -> None:
    """megatron-core's finalize_model_grads (DP / SP / embedding gradient reductions), then the
    per-token loss normalisation as it does it (broadcast the token count over PP, sum it over DP,
    divide every gradient by it), but as tensor arithmetic: megatron tests `num_tokens > 0` on the
    host, a GPU-to-host sync per step that a CUDA graph cannot capture."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)
    if num_tokens is None:
        return
    pp_group = pg_collection.pp if pg_collection is not None else ps.get_pipeline_model_parallel_group()
    dp_group = (
        pg_collection.dp_cp if pg_collection is not None else ps.get_data_parallel_group(with_context_parallel=True)
    )
    dist.broadcast(num_tokens, src=dist.get_global_rank(pp_group, pp_group.size() - 1), group=pp_group)
    dist.all_reduce(num_tokens, group=dp_group)
    scale = 1.0 / num_tokens.clamp(min=1)  # no tokens: the gradients are zero and stay so
    for chunk in model:
        chunk.scale_gradients(scale)


class StepStats:
    """Sums over a step's micro-batches on the last pipeline stage: [nll, tokens, z, per-category...]."""

    def __init__(self, layout) -> None:
        from megatron_soda.model.loss import category_names

        self.names = category_names(layout)

    def reduce(self, outputs: list[dict], device) -> torch.Tensor:
        """Sum on the last stage, over DP; then give every rank the same numbers."""
        from megatron.core import parallel_state as ps

        width = 3 + 2 * len(self.names)
        total = torch.zeros(width, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
            total += torch.stack([o["stats"] for o in outputs]).sum(dim=0)
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            total.zero_()
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
        return total

    def as_dict(self, total: torch.Tensor) -> dict:
        t = total.tolist()
        n = len(self.names)
        out = {"loss": t[0] / max(t[1], 1), "tokens": int(t[1]), "z_loss": t[2] / max(t[1], 1)}
        for i, name in enumerate(self.names):
            if t[3 + n + i] > 0:
                out[f"loss_{name}"] = t[3 + i] / t[3 + n + i]
        return out


def make_forward_step(cfg: SodaConfig, layout, device: str, fp: FastPaths | None = None, inject_nan: bool = False):
    """megatron's forward_step_func for this config: a micro-batch through `model`, and the loss
    function that turns its output into the loss (and the sums `StepStats` reduces)."""
    from megatron_soda.model.gpt import local_vocab_range, output_weight
    from megatron_soda.model.loss import loss_breakdown, output_losses

    fp = fp or FastPaths()
    vocab_start, _ = local_vocab_range(cfg.model)
    z_weight = cfg.optim.z_loss

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        mask = batch["loss_mask"].to(device, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        output = model(tokens, positions, None)

        def loss_func(output):
            nll, log_z, loss = output_losses(
                output,
                labels,
                mask,
                z_weight,
                cfg.model,
                vocab_start,
                lambda: output_weight(model),
                cfg.parallel.sequence_parallel,
                fused=fp.fused_output,
                into_main_grad=fp.wgrad == "main_grad",
            )
            nll_sum = (nll.detach() * mask).sum()
            z_sum = (log_z.detach().square() * mask).sum()
            if inject_nan:
                loss = loss * float("nan")
            n = mask.sum()
            stats = torch.cat(
                [
                    torch.stack([nll_sum, n, z_sum]).double(),
                    loss_breakdown(nll, labels, mask, layout).reshape(-1),
                ]
            )
            return loss, n.to(torch.int), {"stats": stats}

        return output, loss_func

    return forward_step


def grads_finite(chunks) -> bool:
    bad = torch.zeros(1, device=next(chunks[0].parameters()).device)
    for c in chunks:
        for buf in c.buffers + c.expert_parallel_buffers:
            if not torch.isfinite(buf.grad_data).all():
                bad.fill_(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
