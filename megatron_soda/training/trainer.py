"""The Trainer: one rank's part of a training run, built from a resolved run config.

It owns the model chunks (megatron DDP, bf16 on GPU), the optimizer and LR schedule, and megatron's
forward-backward schedule (inside a CUDA graph when `parallel.cuda_graph` says so). `train_step`
turns this rank's share of one global batch (a list of micro-batches, as the loader yields it) into
one optimizer step (or a skipped one, when a loss or gradient is not finite); `evaluate` runs the
same forward without gradients. `state_dict` / `load_state_dict` are its non-tensor state, which the
checkpointer saves beside the sharded model and optimizer. The loop (loop.py) and `soda bench
train` both build it with `build_trainer` and drive this same step.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from megatron_soda.config import SodaConfig
from megatron_soda.model.fast_paths import FastPaths, install, resolve_fast_paths
from megatron_soda.model.init import layout_invariant_init
from megatron_soda.parallel.setup import resolve_device, setup_parallel, synchronize
from megatron_soda.tokenization.vocab import SodaLayout
from megatron_soda.training.optimizer import build_optimizer, build_scheduler

log = logging.getLogger("soda")

# Eager steps before the graph is captured: the first compiles the Triton kernels, picks cuBLAS
# algorithms and the weight-gradient GEMM form; the capture then replays as the third step.
CUDA_GRAPH_WARMUP_STEPS = 2


def build_trainer(cfg: SodaConfig, layout: SodaLayout, need_data: bool = True) -> Trainer:
    """A validated config -> this rank's Trainer: the device, what each speed switch means on it,
    the process groups and seeds, the model, DDP and optimizer (the loop and the bench both call
    this). Call inside an initialized process group."""
    device = resolve_device(cfg.train.device)
    fp = resolve_fast_paths(cfg, device == "cuda")
    dp = setup_parallel(cfg, graph_safe_rng=fp.cuda_graph != "none")
    check_memory(cfg, device, dp)
    return Trainer(cfg, device, fp, layout, dp)


def check_memory(cfg: SodaConfig, device: str, dp: int) -> None:
    """Refuse, before allocating, a model whose weights, gradients and optimizer state alone exceed
    this rank's memory (activations come on top, so a model that passes may still not fit): bf16
    weights + fp32 gradients, main weights and Adam moments on GPU (18 bytes per parameter, the
    last 12 over DP with the distributed optimizer), fp32 on the CPU backend (16)."""
    from megatron_soda.config import ConfigError, model_state_bytes

    p = cfg.parallel
    params = model_state_bytes(cfg.model, p.tp * p.pp) / 16
    if device == "cuda":
        per_param = 2 + 4 + 12 / (dp if p.distributed_optimizer else 1)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        where = f"{torch.cuda.get_device_name()} ({total / 2**30:.0f} GiB)"
    else:
        import psutil

        per_param = 4 + 4 + 8 / (dp if p.distributed_optimizer else 1)
        total = psutil.virtual_memory().total
        where = f"this host's {total / 2**30:.0f} GiB"
    need = params * per_param
    if need > total:
        raise ConfigError(
            f"model state needs ~{need / 2**30:,.1f} GiB per rank ({params / 1e9:.2f}B parameters per rank x "
            f"{per_param:.0f} bytes), more than {where}: raise parallel.tp / parallel.pp, or use "
            "parallel.distributed_optimizer with more data-parallel ranks"
        )


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
        self.layer_path = path  # e.g. "local spec, torch SDPA attention" (the bench records it)
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
        config.finalize_model_grads_func = self._finalize_grads
        self.time_grad_sync = False  # time the gradient reduction (two device syncs; never inside a CUDA graph)
        self.grad_sync_s = 0.0
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
        self.stats = StepStats(layout, cfg.train.seq_length, cfg.train.position_bucket)
        self.forward_step = make_forward_step(cfg, layout, device, fp)
        self.nan_forward_step = make_forward_step(cfg, layout, device, fp, inject_nan=True)
        from megatron.core import parallel_state as ps

        self.dp_rank = ps.get_data_parallel_rank()
        self.rank0 = dist.get_rank() == 0
        self.step = 0
        self.skipped_steps = 0

    # --- one step ---------------------------------------------------------------------------------

    def train_step(self, micro_batches: list[dict], inject_nan: bool = False) -> dict:
        """One optimizer step over this rank's share of a global batch. Returns the step's
        losses (reduced over every rank), the LR it used, the grad norm, `skipped` (True when a
        non-finite loss or gradient left the weights unchanged), `param_norm` (the weights' norm after
        the step), `update_finite` (False when the update itself made a weight non-finite) and its
        timing: fwd_bwd_s (megatron's schedule, gradient
        reduction included), optimizer_s, step_s."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.grad_sync_s = 0.0
        synchronize(self.device)
        t0 = time.perf_counter()
        slow = self.cfg.train.debug_slow_rank
        if slow and dist.get_rank() == int(slow[0]):  # fault injection: a straggler
            time.sleep(slow[1])
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
        row["param_norm"] = param_norm(self.chunks)
        row["update_finite"] = math.isfinite(row["param_norm"])  # a finite gradient can still make a NaN update
        synchronize(self.device)
        t2 = time.perf_counter()
        self.step += 1
        row.update(fwd_bwd_s=t1 - t0, optimizer_s=t2 - t1, step_s=t2 - t0)
        if self.time_grad_sync:
            row["grad_sync_s"] = self.grad_sync_s
        return row

    def evaluate(self, batches, count: int) -> dict:
        """Mean token NLL (`loss`, and per category and position bucket) over `count` global batches
        drawn from the iterator `batches`."""
        for c in self.chunks:
            c.eval()
        total = None
        with torch.no_grad():
            for _ in range(count):
                s = self.stats.reduce(self._run(next(batches), self.forward_step, True), self.device)
                total = s if total is None else total + s
        for c in self.chunks:
            c.train()
        return self.stats.as_dict(total)

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

    def _finalize_grads(self, *args, **kwargs):
        if not self.time_grad_sync or self.fast_paths.cuda_graph != "none":
            return finalize_grads(*args, **kwargs)
        synchronize(self.device)
        t0 = time.perf_counter()
        out = finalize_grads(*args, **kwargs)
        synchronize(self.device)
        self.grad_sync_s += time.perf_counter() - t0
        return out

    # --- what a checkpoint keeps besides the sharded model and optimizer -------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.scheduler.load_state_dict(state["scheduler"])

    def load_branch_state(self, state: dict) -> None:
        """A branch from another run's checkpoint: its step, and this run's own LR schedule (e.g. a
        decay over the branch's steps) placed at that step; the source's schedule is not taken."""
        self.step = int(state["step"])
        self.scheduler.num_steps = 0
        self.scheduler.step(increment=self.step)


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


def position_buckets(seq_length: int, width: int) -> list[tuple[int, int]]:
    """[lo, hi) token-position ranges the validation loss is reported by (one range: none reported)."""
    return [(lo, min(lo + width, seq_length)) for lo in range(0, seq_length, width)]


def bucket_name(lo: int, hi: int) -> str:
    def short(x: int) -> str:
        return f"{x // 1024}k" if x % 1024 == 0 else str(x)

    return f"pos_{short(lo)}_{short(hi)}"


class StepStats:
    """Sums over a step's micro-batches on the last pipeline stage: [nll, tokens, z, per category
    (sums, counts), per position bucket (sums, counts)]: what the log reports, and the evidence that
    a long context is used (the loss of late positions against early ones)."""

    def __init__(self, layout, seq_length: int = 0, bucket: int = 4096) -> None:
        from megatron_soda.model.loss import category_names

        self.names = category_names(layout)
        self.buckets = position_buckets(seq_length, bucket) if seq_length > bucket else []

    def reduce(self, outputs: list[dict], device) -> torch.Tensor:
        """Sum on the last stage, over DP x CP (a CP rank holds part of every sequence); then give
        every rank the same numbers."""
        from megatron.core import parallel_state as ps

        width = 3 + 2 * len(self.names) + 2 * len(self.buckets)
        total = torch.zeros(width, dtype=torch.float64, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and outputs:
            total += torch.stack([o["stats"] for o in outputs]).sum(dim=0)
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
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
        at, k = 3 + 2 * n, len(self.buckets)
        for i, (lo, hi) in enumerate(self.buckets):
            if t[at + k + i] > 0:
                out[f"loss_{bucket_name(lo, hi)}"] = t[at + i] / t[at + k + i]
        return out


def make_forward_step(cfg: SodaConfig, layout, device: str, fp: FastPaths | None = None, inject_nan: bool = False):
    """megatron's forward_step_func for this config: a micro-batch through `model`, and the loss
    function that turns its output into the loss (and the sums `StepStats` reduces)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_soda.model.gpt import local_vocab_range, output_weight
    from megatron_soda.model.loss import loss_breakdown, output_losses

    fp = fp or FastPaths()
    vocab_start, _ = local_vocab_range(cfg.model)
    z_weight = cfg.optim.z_loss
    buckets = StepStats(layout, cfg.train.seq_length, cfg.train.position_bucket).buckets
    bounds = torch.tensor([hi for _, hi in buckets[:-1]], device=device) if buckets else None

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens).contiguous()
        local = {
            "tokens": tokens,
            "labels": batch["labels"].to(device, non_blocking=True),
            "loss_mask": batch["loss_mask"].to(device, non_blocking=True),
            "positions": positions,
        }
        # context parallelism: this rank's two of 2 x CP chunks of every sequence (megatron-core's
        # split, which its RoPE follows); RoPE takes the positions from the table, not from here
        local = get_batch_on_this_cp_rank(local)
        tokens, labels, mask, positions = local["tokens"], local["labels"], local["loss_mask"], local["positions"]
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
                impl=fp.output,
                into_main_grad=fp.wgrad == "main_grad",
            )
            nll_sum = (nll.detach() * mask).sum()
            z_sum = (log_z.detach().square() * mask).sum()
            if inject_nan:
                loss = loss * float("nan")
            n = mask.sum()
            parts = [torch.stack([nll_sum, n, z_sum]).double(), loss_breakdown(nll, labels, mask, layout).reshape(-1)]
            if bounds is not None:  # the loss by position bucket (each token's position in its sequence)
                b = torch.bucketize(positions.reshape(-1), bounds, right=True)
                w = mask.reshape(-1).double()
                sums = torch.zeros(len(buckets), dtype=torch.float64, device=nll.device)
                parts += [sums.index_add(0, b, nll.detach().reshape(-1).double() * w), sums.index_add(0, b, w)]
            stats = torch.cat(parts)
            return loss, n.to(torch.int), {"stats": stats}

        return output, loss_func

    return forward_step


def param_norm(chunks) -> float:
    """The L2 norm of the whole model's weights: each tensor-parallel shard once, weights that every
    TP rank holds (norms) once, summed over TP and PP (DP ranks hold copies). One multi-tensor norm
    per step; not finite exactly when some weight is not."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    params = [p for c in chunks for p in c.parameters() if param_is_not_tensor_parallel_duplicate(p)]
    sq = torch.zeros(1, dtype=torch.float64, device=next(chunks[0].parameters()).device)
    if params:
        sq += torch.stack(torch._foreach_norm(params)).double().square().sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return float(sq.sqrt().item())


def grads_finite(chunks) -> bool:
    bad = torch.zeros(1, device=next(chunks[0].parameters()).device)
    for c in chunks:
        for buf in c.buffers + c.expert_parallel_buffers:
            if not torch.isfinite(buf.grad_data).all():
                bad.fill_(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0
