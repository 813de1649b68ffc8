"""Bytes each process group moves per training step, counted at torch.distributed's calls.

`soda plan` predicts the communication of a layout from the model's shapes (docs/PLAN.md); this
counts what a run actually sends, so the two can be compared exactly (tests/test_plan.py does, on
gloo). With `train.comm_stats`, `start()` wraps torch.distributed's collectives and point-to-point
calls: the module attributes megatron-core calls through (`torch.distributed.all_reduce`, ...),
torch's own `distributed_c10d` globals (which `all_gather_object`, `P2POp` and `batch_isend_irecv`
use), and every module-level alias megatron-core took at import (`dist_all_gather_func =
torch.distributed.all_gather_into_tensor`), so no call escapes by the name it was imported under.
`stop()` puts the originals back.

The unit is the bytes of the logical tensor of the call, as this rank hands it over, the size the
usual cost formulas take (ring all-reduce moves 2(n-1)/n of it per rank; all-gather and
reduce-scatter (n-1)/n; the planner applies those factors only to time, never to these counts):
- all_reduce, all_reduce_coalesced, broadcast, reduce: the tensor(s);
- all_gather, all_gather_into_tensor, _all_gather_base: the whole gathered output;
- reduce_scatter, reduce_scatter_tensor, _reduce_scatter_base: the whole input, before reduction;
- all_to_all, all_to_all_single: this rank's input;
- send, recv, isend, irecv: the tensor; batch_isend_irecv: each of its ops, counted under
  `batch_isend_irecv.isend` / `batch_isend_irecv.irecv`.
A call made inside another wrapped call (torch's `_all_gather_base` forwarding to
`all_gather_into_tensor`) is counted once, under the outer name.

Groups are named by comparing with megatron-core's parallel_state getters (tp, pp, dp, cp, dp_cp,
tp_cp, tp_dp, tp_dp_cp, embd, pos_embd, mp, dist_opt (the distributed optimizer's instance group, over
which it reduces the gradient norm), and the gloo twins); the default group is `world`;
a group equal to none of them is named by its ranks. Where two getters return the same object, the
first name in `GROUP_GETTERS` wins.

`step_done(step)` appends this rank's counters as one JSON line to RUN_DIR/comm/rank<R>.jsonl
({"step", "rank", "bytes": {group: {op: n}}, "calls": {group: {op: n}}}) and resets them.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
import threading
from pathlib import Path

# op name -> how to read (bytes, group) from the call's bound arguments
_TENSOR, _FIRST_LIST, _OUTPUT, _INPUT, _INPUT_LIST = "tensor", "list", "output", "input", "input_list"
WRAPPED: dict[str, tuple[str, str]] = {
    "all_reduce": (_TENSOR, "tensor"),
    "all_reduce_coalesced": (_FIRST_LIST, "tensors"),
    "broadcast": (_TENSOR, "tensor"),
    "reduce": (_TENSOR, "tensor"),
    "all_gather": (_FIRST_LIST, "tensor_list"),
    "all_gather_into_tensor": (_OUTPUT, "output_tensor"),
    "_all_gather_base": (_OUTPUT, "output_tensor"),
    "reduce_scatter": (_INPUT_LIST, "input_list"),
    "reduce_scatter_tensor": (_INPUT, "input"),
    "_reduce_scatter_base": (_INPUT, "input"),
    "all_to_all": (_INPUT_LIST, "input_tensor_list"),
    "all_to_all_single": (_INPUT, "input"),
    "send": (_TENSOR, "tensor"),
    "recv": (_TENSOR, "tensor"),
    "isend": (_TENSOR, "tensor"),
    "irecv": (_TENSOR, "tensor"),
}
BATCH = "batch_isend_irecv"

# (name, parallel_state getter, its keyword arguments), in the order names are given
GROUP_GETTERS: tuple[tuple[str, str, dict], ...] = (
    ("tp", "get_tensor_model_parallel_group", {}),
    ("pp", "get_pipeline_model_parallel_group", {}),
    ("dp", "get_data_parallel_group", {}),
    ("cp", "get_context_parallel_group", {}),
    ("dp_cp", "get_data_parallel_group", {"with_context_parallel": True}),
    ("tp_cp", "get_tensor_and_context_parallel_group", {}),
    ("tp_dp", "get_tensor_and_data_parallel_group", {}),
    ("tp_dp_cp", "get_tensor_and_data_parallel_group", {"with_context_parallel": True}),
    ("embd", "get_embedding_group", {}),
    ("pos_embd", "get_position_embedding_group", {}),
    ("mp", "get_model_parallel_group", {}),
    ("dist_opt", "get_intra_distributed_optimizer_instance_group", {}),
    ("dp_gloo", "get_data_parallel_group_gloo", {}),
    ("dp_cp_gloo", "get_data_parallel_group_gloo", {"with_context_parallel": True}),
)
# modules whose module-level aliases of torch.distributed functions are re-pointed too
ALIAS_PREFIXES = ("megatron.", "megatron_soda.", "torch.distributed.")

_ACTIVE: list[CommStats] = []  # at most one instance counts at a time


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def group_names() -> dict[int, str]:
    """id(process group) -> its name, from megatron-core's getters (those that exist here)."""
    import torch.distributed as dist

    names: dict[int, str] = {}
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        ps = None
    for name, getter, kwargs in GROUP_GETTERS if ps is not None else ():
        fn = getattr(ps, getter, None)
        if fn is None:
            continue
        try:
            group = fn(**kwargs)
        except (AssertionError, RuntimeError, TypeError, AttributeError):
            continue  # not initialized in this session (no such layout)
        if group is not None and not isinstance(group, (list, tuple)):
            names.setdefault(id(group), name)
    if dist.is_initialized():
        names.setdefault(id(dist.group.WORLD), "world")
    return names


class CommStats:
    """Per-step byte and call counters of this rank's torch.distributed traffic (module docstring)."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool) -> None:
        self.path = Path(run_dir) / "comm" / f"rank{rank}.jsonl"
        self.rank, self.enabled = rank, enabled
        self.bytes: dict[str, dict[str, int]] = {}
        self.calls: dict[str, dict[str, int]] = {}
        self._patched: list[tuple[object, str, object]] = []
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()
        self._depth = threading.local()

    # --- counting ---------------------------------------------------------------------------------

    def name_of(self, group) -> str:
        import torch.distributed as dist

        if group is None:
            return "world"
        name = self._names.get(id(group))
        if name is None:
            self._names = group_names()
            name = self._names.get(id(group))
        if name is None:
            try:
                name = "ranks" + ",".join(str(r) for r in dist.get_process_group_ranks(group))
            except (RuntimeError, ValueError):
                name = "unknown"
            self._names[id(group)] = name
        return name

    def add(self, group, op: str, nbytes: int) -> None:
        name = self.name_of(group)
        with self._lock:
            per_op = self.bytes.setdefault(name, {})
            per_op[op] = per_op.get(op, 0) + nbytes
            calls = self.calls.setdefault(name, {})
            calls[op] = calls.get(op, 0) + 1

    def _count(self, op: str, kind: str, arg: str, bound: inspect.BoundArguments) -> None:
        a = bound.arguments
        value = a.get(arg)
        if kind in (_FIRST_LIST, _INPUT_LIST):
            nbytes = sum(_nbytes(t) for t in value or ())
        else:
            nbytes = _nbytes(value)
        self.add(a.get("group"), op, nbytes)

    def _wrap(self, op: str, original):
        kind, arg = WRAPPED[op]
        signature = inspect.signature(original)
        depth = self._depth

        @functools.wraps(original)
        def counted(*args, **kwargs):
            outer = getattr(depth, "n", 0) == 0
            if outer:
                self._count(op, kind, arg, signature.bind(*args, **kwargs))
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                depth.n -= 1

        counted.__soda_comm_original__ = original
        return counted

    def _wrap_batch(self, original, isend):
        depth = self._depth

        @functools.wraps(original)
        def counted(p2p_op_list):
            if getattr(depth, "n", 0) == 0:
                for p in p2p_op_list:
                    is_send = p.op is isend or getattr(p.op, "__soda_comm_original__", None) is isend
                    self.add(p.group, f"{BATCH}.{'isend' if is_send else 'irecv'}", _nbytes(p.tensor))
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(p2p_op_list)
            finally:
                depth.n -= 1

        counted.__soda_comm_original__ = original
        return counted

    # --- the interface the training loop calls ----------------------------------------------------

    def start(self) -> None:
        """When enabled: wrap every collective and point-to-point call (module docstring)."""
        if not self.enabled or self._patched:
            return
        if _ACTIVE:
            raise RuntimeError("another CommStats is already counting in this process")
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        self._names = group_names()
        originals = {op: getattr(c10d, op) for op in (*WRAPPED, BATCH) if hasattr(c10d, op)}
        wrappers = {op: self._wrap(op, fn) for op, fn in originals.items() if op != BATCH}
        if BATCH in originals:
            wrappers[BATCH] = self._wrap_batch(originals[BATCH], originals.get("isend"))
        by_id = {id(fn): op for op, fn in originals.items()}
        modules = [dist, c10d] + [
            m for name, m in list(sys.modules.items()) if m is not None and name.startswith(ALIAS_PREFIXES)
        ]
        seen = set()
        for module in modules:
            if id(module) in seen:
                continue
            seen.add(id(module))
            try:
                attrs = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in attrs:
                op = by_id.get(id(value))
                if op is not None and value is originals[op]:
                    setattr(module, attr, wrappers[op])
                    self._patched.append((module, attr, value))
        _ACTIVE.append(self)

    def step_done(self, step: int) -> None:
        """Append this step's counters to RUN_DIR/comm/rank<R>.jsonl and start the next step at zero."""
        if not self.enabled:
            return
        with self._lock:
            row = {"step": step, "rank": self.rank, "bytes": self.bytes, "calls": self.calls}
            self.bytes, self.calls = {}, {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def stop(self) -> None:
        """Put torch.distributed's functions (and every alias re-pointed) back."""
        for module, attr, original in reversed(self._patched):
            setattr(module, attr, original)
        self._patched = []
        if self in _ACTIVE:
            _ACTIVE.remove(self)


def read_comm(run_dir: Path) -> dict[int, list[dict]]:
    """rank -> its per-step rows, from RUN_DIR/comm/rank*.jsonl."""
    out = {}
    for path in sorted((Path(run_dir) / "comm").glob("rank*.jsonl")):
        out[int(path.stem[4:])] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out
