"""`soda train` / `torchrun ... -m megatron_soda.train`: the training loop on megatron-core.

One process per device. Parallelism is set up in `setup_parallel` (process groups) and
`wrap_model` (DDP + optimizer), the only two places that know about it; the loop itself only calls
megatron-core's forward-backward schedule and the optimizer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_soda.config import ConfigError, SodaConfig, load_config, save_config, validate
from megatron_soda.data import MixtureDataset, SodaDataLoader
from megatron_soda.fast_paths import FastPaths, resolve_fast_paths, save_fast_paths

log = logging.getLogger("soda")


# --- processes and devices ----------------------------------------------------------------------


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device cuda: torch sees no GPU (use --device cpu for the CPU backend)")
    return name


def init_distributed(device: str) -> None:
    """torchrun/SLURM environment -> process group (NCCL on GPU, gloo with the CPU backend)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun with one task per device
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timedelta(minutes=10))
    else:
        from megatron_soda import cpu_backend

        cpu_backend.enable()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("SODA_GLOO_TIMEOUT_S", "300"))))


def setup_parallel(cfg: SodaConfig, need_data: bool = True, fp: FastPaths | None = None) -> int:
    """Process groups for TP x PP x DP; returns the DP degree. CUDA graphs need megatron's graph-safe
    RNG tracker (generator objects a graph can register) from the start."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dp = validate(cfg, dist.get_world_size(), need_data)
    p = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
    )
    torch.manual_seed(cfg.train.seed)
    graphs = fp is not None and fp.cuda_graph != "none"
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed, use_cudagraphable_rng=graphs)
    return dp


# --- model, optimizer, schedule -----------------------------------------------------------------


@dataclass
class Trainer:
    cfg: SodaConfig
    chunks: list  # DDP-wrapped model chunks
    modules: list  # the unwrapped GPTModels
    optimizer: object
    scheduler: object
    fast_paths: FastPaths
    train_schedule: object  # megatron's forward-backward function, inside a full-iteration CUDA graph when on


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


def wrap_model(cfg: SodaConfig, device: str, fp: FastPaths | None = None) -> Trainer:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_soda.fast_paths import install, use_fused_adam
    from megatron_soda.model import build_model

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    fp = fp or resolve_fast_paths(cfg, cuda)
    installed = install(fp)
    modules, path = build_model(cfg.model, cfg.parallel, dtype, cuda, fp)
    if dist.get_rank() == 0:
        log.info("layers: %s; %s; %s", path, fp.describe(), "bf16" if cuda else "fp32 (CPU backend)")
        if installed:
            log.info("megatron-core fast-path hooks filled: %s", ", ".join(installed))
    config = modules[0].config
    compute = [Float16Module(config, m) if dtype == torch.bfloat16 else m for m in modules]
    p = cfg.parallel
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.distributed_optimizer,
    )
    chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_cfg, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(compute)
    ]
    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,  # bf16 model weights, fp32 main copies in the optimizer
        use_distributed_optimizer=p.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    if fp.adam == "fused":
        use_fused_adam(optimizer)
    config.finalize_model_grads_func = finalize_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    if p.overlap_grad_reduce:
        config.grad_sync_func = [c.start_grad_sync for c in chunks] if len(chunks) > 1 else chunks[0].start_grad_sync
    steps = cfg.train.steps
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}[o.schedule]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=int(round(o.warmup_fraction * steps)),
        lr_decay_steps=steps,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=int(round(o.decay_fraction * steps)) if o.schedule == "wsd" else None,
        lr_wsd_decay_style="linear" if o.schedule == "wsd" else None,
    )
    schedule = get_forward_backward_func()
    if fp.cuda_graph == "full_iteration":
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper

        schedule = FullCudaGraphWrapper(schedule, cuda_graph_warmup_steps=CUDA_GRAPH_WARMUP_STEPS)
    return Trainer(cfg, chunks, modules, optimizer, scheduler, fp, schedule)


# Eager steps before the graph is captured: the first compiles the Triton kernels, picks cuBLAS
# algorithms and the weight-gradient GEMM form; the capture then replays as the third step.
CUDA_GRAPH_WARMUP_STEPS = 2


# --- one step -----------------------------------------------------------------------------------


class StepStats:
    """Sums over a step's micro-batches on the last pipeline stage: [nll, tokens, z, per-category...]."""

    def __init__(self, layout) -> None:
        from megatron_soda.loss import category_names

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
    from megatron_soda.loss import loss_breakdown, output_losses
    from megatron_soda.model import local_vocab_range, output_weight

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


def run_schedule(tr: Trainer, loader_iter, forward_step, num_micro: int, forward_only: bool) -> list[dict]:
    """One global batch through megatron's schedule (the training one, graphed when CUDA graphs are
    on; evaluation always eager)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    t = tr.cfg.train
    micro = [next(loader_iter) for _ in range(num_micro)]
    data = [iter(micro) for _ in tr.chunks] if len(tr.chunks) > 1 else iter(micro)
    model = tr.chunks if len(tr.chunks) > 1 else tr.chunks[0]
    schedule = get_forward_backward_func() if forward_only else tr.train_schedule
    if getattr(schedule, "curr_iter", None) and schedule.curr_iter("training") == schedule.cuda_graph_warmup_steps:
        # the capture comes next: hand the eager steps' cached activation blocks back to the device,
        # else the graph's own memory pool comes on top of them (1.7B at micro-batch 2 ran out of memory)
        torch.cuda.empty_cache()
    return schedule(
        forward_step_func=forward_step,
        data_iterator=data,
        model=model,
        num_microbatches=num_micro,
        seq_length=t.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=forward_only,
    )


# --- the loop -----------------------------------------------------------------------------------


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM's warning before preemption) -> save at the end of the step, exit."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self, device) -> bool:
        v = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return v.item() > 0


class MetricsLog:
    def __init__(self, run_dir: Path, cfg: SodaConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.train.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(), dir=str(run_dir))
            except ImportError:
                log.warning("train.wandb_project set but wandb is not installed: logging to TensorBoard only")

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)) and v is not None:
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()


def memory_gb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def train(cfg: SodaConfig) -> dict:
    """Run (or resume) training; returns a summary. Call inside an initialized process group."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_soda import checkpoint as ckpt
    from megatron_soda.model import flops_per_token, param_counts, peak_tflops

    device = resolve_device(cfg.train.device)
    fp = resolve_fast_paths(cfg, device == "cuda")
    dp = setup_parallel(cfg, fp=fp)
    rank0 = dist.get_rank() == 0
    run_dir = Path(cfg.run_dir)
    t = cfg.train

    dataset = MixtureDataset(cfg.data, seq_len=t.seq_length)
    layout = dataset.layout
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = layout.vocab_size
    if cfg.model.vocab_size != layout.vocab_size:
        raise ConfigError(
            f"model.vocab_size {cfg.model.vocab_size} but the shards use a {layout.vocab_size}-id layout "
            f"(text {layout.text_vocab_size}): tokenizer and model disagree"
        )
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_fast_paths(fp, run_dir / "fast_paths.yaml")
    dist.barrier()

    tr = wrap_model(cfg, device, fp)
    loader = SodaDataLoader(dataset, t.micro_batch_size, t.global_batch_size, ps.get_data_parallel_rank(), dp)
    checkpointer = ckpt.Checkpointer(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
    step, skipped_total = 0, 0
    resume_from = ckpt.latest(run_dir) if cfg.checkpoint.resume else None
    if resume_from is None and cfg.checkpoint.init_from:
        ckpt.load_weights(cfg.checkpoint.init_from, tr.modules)
    if resume_from is not None:
        common = ckpt.load(resume_from, tr.modules, tr.optimizer)
        tr.scheduler.load_state_dict(common["scheduler"])
        loader.load_state_dict(common["data"])
        step, skipped_total = common["step"], common.get("skipped_steps", 0)
        if rank0:
            log.info("resumed from %s at step %d (%d samples consumed)", resume_from, step, loader.consumed_samples)

    def save() -> Path:
        common = {
            "step": step,
            "scheduler": tr.scheduler.state_dict(),
            "data": loader.state_dict(),
            "skipped_steps": skipped_total,
            "config": cfg.to_dict(),
        }
        path = checkpointer.save(step, tr.modules, tr.optimizer, common)
        if rank0:
            save_config(cfg, run_dir / "checkpoints" / "config.yaml")
        return path

    counts = param_counts(cfg.model)
    if rank0:
        log.info(
            "model %s: %.1fM non-embedding, %.1fM label (non-emb + 1 embedding), %.1fM total; TP %d PP %d DP %d",
            cfg.model.name,
            counts["non_embedding"] / 1e6,
            counts["label"] / 1e6,
            counts["total"] / 1e6,
            cfg.parallel.tp,
            cfg.parallel.pp,
            dp,
        )
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    stats = StepStats(layout)
    fwd = make_forward_step(cfg, layout, device, fp)
    fwd_nan = make_forward_step(cfg, layout, device, fp, inject_nan=True)
    flops_tok = flops_per_token(cfg.model, t.seq_length)
    peak = peak_tflops(t.peak_tflops)
    metrics = MetricsLog(run_dir, cfg, rank0)
    preempt = Preemption()
    val_loader = None
    if t.eval_interval and cfg.data.val_paths:
        val_loader = build_val_loader(cfg, dp, layout)
    it = iter(loader)
    consecutive_skips = 0
    last_saved = resume_from
    bar = tqdm(total=t.steps, initial=step, disable=not rank0, desc="train", file=sys.stderr, dynamic_ncols=True)
    start_step = step
    while step < t.steps:
        t0 = time.perf_counter()
        for c in tr.chunks:
            c.zero_grad_buffer()
        tr.optimizer.zero_grad()
        f = fwd_nan if step + 1 in t.debug_nan_steps else fwd
        outputs = run_schedule(tr, it, f, num_micro, forward_only=False)
        total = stats.reduce(outputs, device)
        row = stats.as_dict(total)
        finite = math.isfinite(row["loss"]) and grads_finite(tr.chunks)
        lr = tr.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        if finite:
            _, grad_norm, _ = tr.optimizer.step()
            tr.scheduler.step(increment=1)
            consecutive_skips = 0
        else:
            grad_norm = float("nan")
            skipped_total += 1
            consecutive_skips += 1
            if rank0:
                log.warning(
                    "step %d: non-finite loss or gradient, step skipped (%d in a row)", step + 1, consecutive_skips
                )
            if consecutive_skips >= t.max_skipped_steps:
                raise RuntimeError(
                    f"{consecutive_skips} consecutive non-finite steps, the last at step {step + 1}; "
                    f"last good checkpoint: {last_saved or 'none'}"
                )
        step += 1
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens_per_s = t.global_batch_size * t.seq_length / dt
        tflops = flops_tok * tokens_per_s / dist.get_world_size() / 1e12
        row.update(
            lr=lr,
            grad_norm=float(grad_norm) if grad_norm is not None else None,
            tokens_per_s=tokens_per_s,
            tflops_per_device=tflops,
            mfu=tflops / peak if peak else None,
            memory_gb=memory_gb(device),
            step_time_s=dt,
            skipped_steps=skipped_total,
            consumed_samples=loader.consumed_samples,
        )
        if val_loader is not None and step % t.eval_interval == 0:
            row["val_loss"] = evaluate(tr, val_loader, cfg, fwd, device, num_micro, stats)
        if step % t.log_interval == 0 or step == t.steps:
            metrics.write(step, row)
            if rank0:
                bar.set_postfix_str(f"loss {row['loss']:.4f} lr {row['lr']:.2e} {tokens_per_s:,.0f} tok/s")
        bar.update(1)
        checkpointer.poll()
        stop = preempt.agreed(device) or bool(t.exit_interval and step % t.exit_interval == 0)
        if stop or step == t.steps or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
            last_saved = save()
        if stop:
            if rank0:
                bar.write(f"stopping early (signal or train.exit_interval): saved {last_saved} at step {step}")
            break
    bar.close()
    checkpointer.poll(blocking=True)
    metrics.close()
    return {
        "step": step,
        "start_step": start_step,
        "checkpoint": str(last_saved),
        "skipped_steps": skipped_total,
        "preempted": step < t.steps,
    }


def build_val_loader(cfg: SodaConfig, dp: int, layout):
    from megatron.core import parallel_state as ps

    from megatron_soda.data import DataConfig

    val_cfg = DataConfig(
        paths=cfg.data.val_paths, seed=cfg.data.seed, num_workers=0, skip_corrupt=cfg.data.skip_corrupt
    )
    ds = MixtureDataset(val_cfg, layout=layout, seq_len=cfg.train.seq_length)
    return (ds, ps.get_data_parallel_rank(), dp)


def evaluate(tr: Trainer, val, cfg: SodaConfig, fwd, device, num_micro: int, stats: StepStats) -> float:
    """Mean token NLL over the first `eval_batches` global batches of the validation sets (always the same)."""
    ds, dp_rank, dp = val
    t = cfg.train
    loader = SodaDataLoader(ds, t.micro_batch_size, t.global_batch_size, dp_rank, dp, num_workers=0)
    it = iter(loader)
    for c in tr.chunks:
        c.eval()
    total = None
    with torch.no_grad():
        for _ in range(t.eval_batches):
            s = stats.reduce(run_schedule(tr, it, fwd, num_micro, forward_only=True), device)
            total = s if total is None else total + s
    for c in tr.chunks:
        c.train()
    return stats.as_dict(total)["loss"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="soda train", description="train a SODA model (see configs/)")
    parser.add_argument("--config", help="YAML preset, e.g. configs/soda-600m.yaml")
    parser.add_argument("--run-dir", help="checkpoints, config, TensorBoard logs and metrics.jsonl go here")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="cpu: megatron-core on gloo (fp32)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-parameter listings drown the run log
    import warnings

    # megatron-core warns at import and per layer about missing TE/apex and CUDA-only env settings
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cfg = load_config(args.config, rest)
        if args.run_dir:
            cfg.run_dir = args.run_dir
        if args.device:
            cfg.train.device = args.device
        device = resolve_device(cfg.train.device)
        validate(cfg, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))))
    except ConfigError as e:
        print(f"soda train: error: {e}", file=sys.stderr)
        return 2
    init_distributed(device)
    try:
        summary = train(cfg)
    except (ConfigError, RuntimeError) as e:
        if dist.get_rank() == 0:
            print(f"soda train: error: {e}", file=sys.stderr)
        return 1
    finally:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
