"""Checkpoints through megatron-core dist_checkpointing: sharded, loadable under another TP/PP/DP.

Layout of a run directory's `checkpoints/`:
  iter_0000100/     a complete checkpoint (model, optimizer, scheduler, data position, RNG, config)
  .iter_0000200.tmp a save in progress (or one a crash interrupted: ignored, removed later)
  latest            the name of the newest complete checkpoint

A save writes the hidden directory, waits for every rank, renames it and only then points
`latest` at it, so a crash at any moment leaves the previous checkpoint intact and found.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_soda.config import ConfigError, SodaConfig, save_config
from megatron_soda.training.run_dir import CheckpointError, check_run_dir, checkpoint_dir, ckpt_root
from megatron_soda.training.snapshots import HFSnapshots

OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
log = logging.getLogger("soda")


def _layout() -> tuple[int, int, int, int]:
    """(PP, TP, CP, DP) of this run: a checkpoint saved under the same restores each rank's RNG."""
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )


def _saved_layout(common: dict) -> tuple[int, ...]:
    """A checkpoint's layout as (PP, TP, CP, DP); checkpoints from before context parallelism have (PP, TP, DP)."""
    saved = tuple(common.get("layout", ()))
    return (saved[0], saved[1], 1, saved[2]) if len(saved) == 3 else saved


def _rng_object(axes: int = 4) -> ShardedObject:
    """Each rank's RNG states, one shard per (PP, TP, CP, DP) coordinate (CP ranks are distinct
    processes, so CP is an axis: two CP ranks with one key would be duplicates); `axes` 3 reads a
    checkpoint from before CP."""
    pp, tp, cp, dp = _layout()
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    # graph-safe trackers (CUDA graphs on) hold generator objects: save their states as tensors
    state["tracker"] = {
        k: v.get_state() if isinstance(v, torch.Generator) else v
        for k, v in get_cuda_rng_tracker().get_states().items()
    }
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_context_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    if axes == 3:
        return ShardedObject("rng_state", state, (pp, tp, dp), offset[:2] + offset[3:], replica_id=0)
    return ShardedObject("rng_state", state, (pp, tp, cp, dp), offset, replica_id=0)


def _model_sd(chunks) -> dict:
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def sharded_state(chunks, optimizer, is_loading: bool, with_rng: bool, rng_axes: int = 4) -> dict:
    model_sd = _model_sd(chunks)
    state = dict(model_sd)
    if optimizer is not None:  # it finds its params' shards by walking the nested model dicts
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object(rng_axes)
    return state


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, async_save: bool, protected=lambda: set()) -> None:
        """`protected`: names of checkpoints to keep from pruning for now (an HF export reads them)."""
        self.root = ckpt_root(run_dir)
        self.keep_last = keep_last
        self.protected = protected
        self.async_queue = None
        self.in_flight: Path | None = None  # the partial directory of the async save not yet finalized
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def save(self, step: int, chunks, optimizer, common: dict) -> Path:
        self.poll(blocking=True)  # one save at a time: the previous one is finalized first
        final = self.root / f"iter_{step:07d}"
        tmp = self.root / f".iter_{step:07d}.tmp"
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a run never replaces a checkpoint it did not resume from
                raise CheckpointError(f"{final} exists already: refusing to overwrite it")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            self._warn_if_short_of_space(chunks, optimizer)
        dist.barrier()
        state = sharded_state(chunks, optimizer, is_loading=False, with_rng=True)
        state["common"] = dict(common, layout=_layout())

        def finalize() -> None:
            self.in_flight = None
            dist.barrier()
            if dist.get_rank() == 0:
                os.replace(tmp, final)
                pointer = self.root / ".latest.tmp"
                pointer.write_text(final.name)
                os.replace(pointer, self.root / "latest")
                self._prune()
            dist.barrier()

        try:
            if self.async_queue is None:
                dist_checkpointing.save(state, str(tmp))
                finalize()
            else:
                request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
                request.add_finalize_fn(finalize)
                self.in_flight = tmp
                self.async_queue.schedule_async_request(request)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            raise self._failed(tmp, e) from e
        return final

    def _failed(self, tmp: Path, error: BaseException) -> BaseException:
        """A save that failed: its partial directory removed (the space a retry needs), `latest`
        left on the previous complete checkpoint, and a full disk named as such."""
        full = disk_full(error, tmp)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            latest_name = (self.root / "latest").read_text().strip() if (self.root / "latest").is_file() else "none"
            return CheckpointError(
                f"saving {tmp.name[1:-4]} to {self.root}: no space left on device; the partial save was removed "
                f"and latest still names {latest_name}: free space, then resume"
            )
        return error

    def _warn_if_short_of_space(self, chunks, optimizer) -> None:
        """Before a save: the last checkpoint's size (or ~16 bytes per parameter before the first)
        against the free space, so a full disk is seen coming."""
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir())
        if done:
            need = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())
        else:
            need = 16 * sum(p.numel() for c in chunks for p in c.parameters()) * dist.get_world_size()
        free = shutil.disk_usage(self.root).free
        if free < 1.1 * need:
            log.warning(
                "checkpoint save to %s needs ~%.2f GB, %.2f GB free there: it may fail",
                self.root,
                need / 1e9,
                free / 1e9,
            )

    def poll(self, blocking: bool = False) -> None:
        """Finish async saves that are done (all ranks call this at the same points). A write that
        failed in the background (a full disk) fails here, as a synchronous save would have."""
        if self.async_queue is None:
            return
        try:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        except BaseException as e:  # torch's CheckpointException is a BaseException
            tmp, self.in_flight = self.in_flight, None
            if tmp is None:
                raise
            raise self._failed(tmp, e) from e

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir())
        latest = (self.root / "latest").read_text().strip() if (self.root / "latest").is_file() else None
        keep = self.protected()
        for old in done[: max(0, len(done) - max(1, self.keep_last))]:
            if old.name != latest and old.name not in keep:  # what a resume or an export reads stays
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".iter_*.tmp"):  # saves a crash interrupted; none is in flight now
            shutil.rmtree(stale, ignore_errors=True)


def disk_full(error: BaseException, where: Path) -> bool:
    """Whether a failed write failed for want of space: ENOSPC / EDQUOT anywhere in the exception
    chain (torch's CheckpointException keeps each rank's failure), or next to no space left at
    `where` (torch's zip writer reports a short write only as "unexpected pos ...")."""
    import errno

    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
            todo += [f[0] for f in failures.values() if isinstance(f, tuple) and f and isinstance(f[0], BaseException)]
    try:
        return shutil.disk_usage(where if where.exists() else where.parent).free < 16 * 2**20
    except OSError:
        return False


def _materialize_optimizer_state(optimizer) -> None:
    """Give an optimizer that has not stepped yet its state tensors (zeros), which the distributed
    optimizer needs before it can describe what to load: one Adam step with zero gradients at
    lr = weight decay = 0, so no parameter moves; the loaded state then replaces it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if inner.state:
            continue
        saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for g, (lr, wd) in zip(inner.param_groups, saved, strict=True):
            g["lr"], g["weight_decay"] = lr, wd


def _steps_in(tree) -> set[int]:
    if isinstance(tree, dict):
        found = {int(g["step"]) for g in tree.get("param_groups", []) if isinstance(g, dict) and "step" in g}
        for v in tree.values():
            found |= _steps_in(v)
        return found
    if isinstance(tree, (list, tuple)):
        return set().union(*(_steps_in(v) for v in tree)) if tree else set()
    return set()


def _restore_adam_step(optimizer, loaded_state) -> None:
    """megatron-core 0.16's distributed optimizer, on torch's Adam (no apex/TE: every CPU run), loads
    exp_avg / exp_avg_sq but leaves Adam's per-parameter 'step' at its pre-load value, which changes
    the bias correction of every later update. The checkpoint keeps the step in its param groups."""
    steps = _steps_in(loaded_state)
    if len(steps) != 1:
        return
    (step,) = steps
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                old = state["step"]  # fused AdamW keeps it on the parameter's device
                state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device)


def load(path: Path, chunks, optimizer) -> dict:
    """Restore model and optimizer (and RNG when the layout is unchanged); returns the common state."""
    common = common_state(path)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    same_layout = _saved_layout(common) == _layout()
    axes = len(common.get("layout", ())) or 4
    request = sharded_state(chunks, optimizer, is_loading=True, with_rng=same_layout, rng_axes=axes)
    loaded = read_checkpoint(path, "tensors", lambda: dist_checkpointing.load(request, str(path)))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded[f"model{i}"], strict=True)
    if optimizer is not None:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_adam_step(optimizer, loaded["optimizer"])
    if same_layout:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        tracker = get_cuda_rng_tracker()
        current = tracker.get_states()
        for k, v in rng["tracker"].items():  # a graph registered the generator objects: set them in place
            if isinstance(current.get(k), torch.Generator):
                current[k].set_state(v)
            else:
                current[k] = v
        tracker.set_states(current)
    return common


# What a checkpoint's `.metadata` (torch distributed checkpoint, a pickle) may name: its own metadata
# classes, torch.Size, dtypes and layouts, a few containers. Anything else is code a crafted file
# would run when torch unpickles it, so it is refused before torch reads the file.
SAFE_PICKLE_GLOBALS = {
    ("torch", "Size"),
    ("torch._utils", "_get_layout"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            (module, name) in SAFE_PICKLE_GLOBALS
            or module.startswith("torch.distributed.checkpoint.")
            or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which is not checkpoint metadata")
        return super().find_class(module, name)


def check_metadata(path: Path) -> None:
    """Read `path/.metadata` with the allow-listing unpickler above (a CheckpointError names what it
    refused; torch's own reader, plain pickle, only sees files that passed), then check that every
    shard file it lists is there and long enough: a missing or cut `.distcp` is one line, not a
    60-line traceback from the middle of a load."""
    meta = path / ".metadata"
    if not meta.is_file():
        raise CheckpointError(f"{path}: no .metadata (not a complete torch distributed checkpoint)")
    try:
        with open(meta, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001  (a malformed or crafted file: either way not loaded)
        raise CheckpointError(f"{meta}: refusing to load it: {e}") from None
    need: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: shard file {rel} is missing (the checkpoint is incomplete)")
        if f.stat().st_size < size:
            raise CheckpointError(
                f"{path}: shard file {rel} is truncated ({f.stat().st_size} bytes, its index needs {size})"
            )


def read_checkpoint(path: Path, what: str, fn):
    """Run a megatron/torch checkpoint read; whatever it raises on a file it cannot read (a garbage
    or empty common.pt, a newer format version) is one line naming the checkpoint."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit, CheckpointError):
        raise
    except BaseException as e:  # noqa: BLE001  (torch's CheckpointException is a BaseException)
        first = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, EOFError) or first in ("", type(e).__name__):
            first = "a file in it is empty or cut short"
        elif "weights_only" in first or "Weights only load failed" in first:
            first = "not a checkpoint file torch's safe loader reads"
        raise CheckpointError(f"{path}: cannot read its {what} ({type(e).__name__}: {first[:200]})") from None


def resolve(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory or one iter_* directory -> that checkpoint,
    its metadata checked (the allow-listing unpickler, every shard file present)."""
    path = checkpoint_dir(path)
    check_metadata(path)
    return path


def common_state(path: str | Path) -> dict:
    """The non-tensor part of a checkpoint (step, config, data position, layout), read by one process."""
    path = resolve(path)
    state = read_checkpoint(path, "common state", lambda: dist_checkpointing.load_common_state_dict(str(path)))
    if not isinstance(state, dict) or not isinstance(state.get("common"), dict):
        raise CheckpointError(f"{path}: its common state is not a megatron-soda checkpoint's")
    return state["common"]


def load_weights(path: str | Path, chunks) -> None:
    """Model weights only, from any layout's checkpoint (`checkpoint.init_from`)."""
    path = resolve(path)
    loaded = read_checkpoint(path, "weights", lambda: dist_checkpointing.load(_model_sd(chunks), str(path)))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded[f"model{i}"], strict=True)


# --- the run's view: what to save, when, and what a resume restores --------------------------------

SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size")


def check_same_model(cfg: SodaConfig, common: dict, path) -> None:
    """Resuming needs the model the checkpoint holds: a different shape is one line, not megatron's
    shape-mismatch traceback."""
    saved = common.get("config", {}).get("model", {})
    diff = [
        f"model.{k} {getattr(cfg.model, k)} (checkpoint: {saved[k]})"
        for k in (*SHAPE_KEYS, "vocab_size", "tie_embeddings")
        if k in saved and saved[k] != getattr(cfg.model, k)
    ]
    if diff:
        raise ConfigError(
            f"{path} holds another model than this run asks for: {', '.join(diff)}; resume with the "
            "checkpoint's settings, or start a new run (another --run-dir, or --checkpoint.init_from for weights)"
        )


class CheckpointManager:
    """The stateful parts of a run (the Trainer, the loader, the data-integrity counts) and their
    checkpoints: `load_latest` restores them (or starts from `checkpoint.init_from` weights),
    `maybe_save` decides itself whether a step is saved. Every rank calls both at the same steps."""

    def __init__(self, cfg: SodaConfig, trainer, loader, integrity) -> None:
        self.cfg, self.trainer, self.loader, self.integrity = cfg, trainer, loader, integrity
        c = cfg.checkpoint
        self.snapshots = HFSnapshots(Path(cfg.run_dir), c.hf_interval, trainer.rank0)
        self.writer = Checkpointer(cfg.run_dir, c.keep_last, c.async_save, protected=self.snapshots.in_use)
        self.last_saved: Path | None = None

    def load_latest(self) -> Path | None:
        """Resume from the run directory's `latest` (returns it), else branch from `branch_from` or
        load `init_from` weights."""
        c = self.cfg.checkpoint
        path = check_run_dir(Path(self.cfg.run_dir), c.resume, c.branch_from)
        if path is None and c.branch_from:
            self._branch(resolve(c.branch_from))
            return None
        if path is None:
            if c.init_from:
                load_weights(c.init_from, self.trainer.modules)
                if self.trainer.rank0:
                    log.info("weights from %s (a new run: step 0, fresh optimizer)", c.init_from)
            return None
        check_same_model(self.cfg, common_state(path), path)
        common = load(path, self.trainer.modules, self.trainer.optimizer)
        self.trainer.load_state_dict(common)
        self.loader.load_state_dict(common["data"])
        self.integrity.load_state_dict(common["data"])
        self.last_saved = path
        if self.trainer.rank0:
            log.info(
                "resumed from %s at step %d (%d samples consumed)",
                path,
                self.trainer.step,
                self.loader.consumed_samples,
            )
        return path

    def _branch(self, src: Path) -> None:
        """Weights, optimizer state and step from another run's checkpoint (only read: the source run
        is never written to); the data position starts at 0 on this run's mixture."""
        common = common_state(src)
        check_same_model(self.cfg, common, src)
        if self.cfg.train.steps <= int(common["step"]):
            raise ConfigError(
                f"checkpoint.branch_from {src} is at step {common['step']}: train.steps {self.cfg.train.steps} "
                "must go past it (the branch counts on from there)"
            )
        load(src, self.trainer.modules, self.trainer.optimizer)
        self.trainer.load_branch_state(common)
        if self.trainer.rank0:
            log.info(
                "branched from %s at step %d: weights, optimizer state and step taken; this run's LR schedule and "
                "mixture from here, its data position at 0 (source run untouched)",
                src,
                self.trainer.step,
            )

    def maybe_save(self, step: int, force: bool = False) -> Path | None:
        """Save at `checkpoint.save_interval` steps, at `checkpoint.hf_interval` steps (then also
        exported to RUN_DIR/hf/ in the background), or now when `force` (the last step, a stop)."""
        self.writer.poll()
        interval, snapshot = self.cfg.checkpoint.save_interval, self.snapshots.due(step)
        if not (force or snapshot or (interval and step % interval == 0)):
            return None
        data = {**self.loader.state_dict(), **self.integrity.state_dict()}
        common = {**self.trainer.state_dict(), "data": data, "config": self.cfg.to_dict()}
        self.last_saved = self.writer.save(step, self.trainer.modules, self.trainer.optimizer, common)
        if self.trainer.rank0:
            save_config(self.cfg, self.writer.root / "config.yaml")
        if snapshot:
            self.writer.poll(blocking=True)  # an async save is complete before its export reads it
            self.snapshots.start(step, self.last_saved)
        return self.last_saved

    def finish(self) -> None:
        """Wait for an async save and the HF snapshots in flight."""
        self.writer.poll(blocking=True)
        self.snapshots.finish()
