"""Checkpoints through megatron-core dist_checkpointing: sharded, loadable under another TP/PP/DP.

Layout of a run directory's `checkpoints/`:
  iter_0000100/     a complete checkpoint (model, optimizer, scheduler, data position, RNG, config)
  .iter_0000200.tmp a save in progress (or one a crash interrupted: ignored, removed later)
  latest            the name of the newest complete checkpoint

A save writes the hidden directory, waits for every rank, renames it and only then points
`latest` at it, so a crash at any moment leaves the previous checkpoint intact and found.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_soda.config import UserError

OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class CheckpointError(UserError, RuntimeError):
    """A path that is not a complete checkpoint of ours."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: str | Path) -> Path | None:
    root = ckpt_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _layout() -> tuple[int, int, int]:
    return (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )


def _rng_object() -> ShardedObject:
    pp, tp, dp = _layout()
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
        ps.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (pp, tp, dp), offset, replica_id=0)


def _model_sd(chunks) -> dict:
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def sharded_state(chunks, optimizer, is_loading: bool, with_rng: bool) -> dict:
    model_sd = _model_sd(chunks)
    state = dict(model_sd)
    if optimizer is not None:  # it finds its params' shards by walking the nested model dicts
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object()
    return state


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep_last: int, async_save: bool) -> None:
        self.root = ckpt_root(run_dir)
        self.keep_last = keep_last
        self.async_queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_queue = AsyncCallsQueue()

    def save(self, step: int, chunks, optimizer, common: dict) -> Path:
        self.poll(blocking=True)  # one save at a time: the previous one is finalized first
        final = self.root / f"iter_{step:07d}"
        tmp = self.root / f".iter_{step:07d}.tmp"
        if dist.get_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        state = sharded_state(chunks, optimizer, is_loading=False, with_rng=True)
        state["common"] = dict(common, layout=_layout())

        def finalize() -> None:
            dist.barrier()
            if dist.get_rank() == 0:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                pointer = self.root / ".latest.tmp"
                pointer.write_text(final.name)
                os.replace(pointer, self.root / "latest")
                self._prune()
            dist.barrier()

        if self.async_queue is None:
            dist_checkpointing.save(state, str(tmp))
            finalize()
        else:
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(finalize)
            self.async_queue.schedule_async_request(request)
        return final

    def poll(self, blocking: bool = False) -> None:
        """Finish async saves that are done (all ranks call this at the same points)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir())
        latest = (self.root / "latest").read_text().strip() if (self.root / "latest").is_file() else None
        for old in done[: max(0, len(done) - max(1, self.keep_last))]:
            if old.name != latest:  # what a resume reads is never pruned
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".iter_*.tmp"):  # saves a crash interrupted; none is in flight now
            shutil.rmtree(stale, ignore_errors=True)


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
    check_metadata(path)
    common = dist_checkpointing.load_common_state_dict(str(path))["common"]
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
    same_layout = tuple(common.get("layout", ())) == _layout()
    request = sharded_state(chunks, optimizer, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(request, str(path))
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
    """Read `path/.metadata` with the allow-listing unpickler above; a CheckpointError names what
    it refused. torch's own reader (plain pickle) only sees files that passed."""
    meta = path / ".metadata"
    if not meta.is_file():
        return  # megatron's reader reports a missing file itself
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001  (a malformed or crafted file: either way not loaded)
        raise CheckpointError(f"{meta}: refusing to load it: {e}") from None


def resolve(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory or one iter_* directory -> that checkpoint."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron-core distributed checkpoint (no metadata.json)")
    check_metadata(path)
    return path


def common_state(path: str | Path) -> dict:
    """The non-tensor part of a checkpoint (step, config, data position, layout), read by one process."""
    return dist_checkpointing.load_common_state_dict(str(resolve(path)))["common"]


def load_weights(path: str | Path, chunks) -> None:
    """Model weights only, from any layout's checkpoint (`checkpoint.init_from`)."""
    path = resolve(path)
    loaded = dist_checkpointing.load(_model_sd(chunks), str(path))
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded[f"model{i}"], strict=True)
