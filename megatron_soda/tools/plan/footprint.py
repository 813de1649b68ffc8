"""Activation memory, measured: one micro-batch of a small model built by the run's own code.

`measure` builds a 2-layer model of the run's kind (megatron-core GPTModel with our seams, the fast
paths the run resolves to on a GPU, Float16Module + megatron DDP as the Trainer wraps it), in bf16
on the CPU, and runs one micro-batch's forward, loss (`trainer.make_forward_step`, the fused output
layer + CE when the run uses it) and backward under a dispatch mode that records every storage
created and when it is freed. Each storage is written down by what its shape is made of: every
size of the small model is distinct (`MEASURE`), so an axis of 28 is the sequence, 40 the hidden
size, 72 the FFN width, 512 the padded vocabulary and so on (`SYMBOLS`); a storage of shape
[28, 3, 144] is s x b x 2ffn. Evaluating those monomials at the real model's sizes replays the
micro-batch's memory timeline at the real shape, so the peak is taken at the moment it happens
there, not at the small shape's.

Scaling rules (docs/PLAN.md; `tests/test_plan.py` checks each against a measurement at that layout):
- sizes: the measured monomials at the target's per-rank sizes (heads, KV groups, FFN and vocabulary
  divided by TP: megatron shards exactly those);
- layers: what layer 1 saves in the forward stands for every layer after the first (x (l - 1)),
  since a stage's layers are alike; the peak then falls at the end of the forward or in the first
  layer's backward, where all of them are held;
- sequence parallelism: what the layers, the embedding and the final norm save with shape s x h
  (nothing TP-sharded in it) is divided by TP;
- context parallelism: measured at CP 2, where the local sequence s / CP and the whole sequence are
  different sizes: the K and V the CP attention all-gathers (and SDPA keeps for backward) are
  tensors of the whole sequence there, the rest of the local one, and both scale to any CP (the
  measurement at CP 1 cannot show this: its K and V are views of the local QKV output).
Recomputation is measured, not scaled: each `parallel.recompute` mode is its own measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

# the small model: every size distinct (and distinct from their products that appear as one axis)
MEASURE = {
    "b": 5,
    "s": 28,
    "h": 40,
    "hd": 8,
    "heads": 12,
    "groups": 2,
    "ffn": 76,
    "vocab": 388,  # the small token layout's ids, padded to 512 (multiple of 128)
    "vocab_pad": 128,
    "chunk": 37,  # 140 tokens = 3 chunks of 37 + 29 (at CP 2: 70 = 37 + 33): the partial chunks match no size
}
SMALL_LAYOUT = {"text_vocab_size": 256, "bos_id": 0, "eos_id": 1, "codebooks": 2, "codebook_size": 64}
SYMBOLS = ("b", "s", "n", "sf", "nf", "sc", "nch", "h", "hd", "qh", "kvh", "q", "kv", "qkv", "f", "f2", "v", "c")
# where CP splits the sequence: the whole sequence (and b x it), and the CP attention's 2 x CP chunks
# (each of sc = s / 2 positions); told apart from s only at CP > 1
CP_ONLY = ("sf", "nf", "sc", "nch")
TP_SHARDED = {"qh", "kvh", "q", "kv", "qkv", "f", "f2", "v"}
REGIONS = ("embedding", "layer0", "layer1", "final_norm", "output", "loss", "other")
LAYER_REGIONS = {"layer0", "layer1"}
HEAD_REGIONS = {"final_norm", "output", "loss"}
SP_REGIONS = {"embedding", "layer0", "layer1", "final_norm"}
MIN_SYMBOLIC = 64  # elements: smaller storages (scalars, per-stat vectors) are counted as measured


@dataclass(frozen=True)
class Sizes:
    """One rank's sizes that the symbols stand for: the model's (global) and its layout's split."""

    b: int
    seq: int
    h: int
    hd: int
    heads: int
    groups: int
    ffn: int
    vocab: int  # padded
    chunk: int
    tp: int = 1
    cp: int = 1

    def values(self) -> dict[str, int]:
        s = self.seq // self.cp
        n = self.b * s
        qh, kvh = self.heads // self.tp, self.groups // self.tp
        f = self.ffn // self.tp
        return {
            "b": self.b,
            "s": s,
            "n": n,
            "h": self.h,
            "hd": self.hd,
            "qh": qh,
            "kvh": kvh,
            "q": qh * self.hd,
            "kv": kvh * self.hd,
            "qkv": (qh + 2 * kvh) * self.hd,
            "f": f,
            "f2": 2 * f,
            "v": self.vocab // self.tp,
            "c": min(self.chunk, n),
            "sf": self.seq,
            "nf": self.b * self.seq,
            "sc": max(1, s // 2),
            "nch": 2 * self.cp,
        }


def sizes_of(m, seq: int, micro_batch: int, tp: int = 1, cp: int = 1) -> Sizes:
    """The Sizes of a ModelConfig at a sequence length and micro-batch."""
    return Sizes(
        b=micro_batch,
        seq=seq,
        h=m.hidden_size,
        hd=m.head_dim,
        heads=m.num_attention_heads,
        groups=m.num_query_groups,
        ffn=m.ffn_hidden_size,
        vocab=m.padded_vocab_size,
        chunk=m.ce_chunk_tokens,
        tp=tp,
        cp=cp,
    )


@dataclass(frozen=True)
class Structure:
    """What decides which tensors a layer saves (not their sizes): the measurement key."""

    embedding: str = "torch"
    output: str = "torch"
    norm: str = "torch"
    rope: str = "torch"
    wgrad: str = "torch"
    recompute: str = "none"
    tp: int = 1
    sequence_parallel: bool = False
    cp: int = 1


@dataclass
class Footprint:
    """The recorded timeline of one micro-batch: storages (rows) and alloc / free events."""

    structure: Structure
    measured_at: Sizes
    exponents: np.ndarray  # [R, S] power of each symbol in the storage's size
    constant: np.ndarray  # [R] the remaining factor (axes that are no symbol), elements
    itemsize: np.ndarray  # [R] bytes per element
    measured_bytes: np.ndarray  # [R] bytes at the measured shape
    region: np.ndarray  # [R] index into REGIONS: where it was first saved for backward, else made
    backward: np.ndarray  # [R] bool: created during backward
    saved: np.ndarray  # [R] bool: saved for backward (autograd's saved tensors)
    events: np.ndarray  # [E] +(r+1) alloc of row r, -(r+1) its free
    forward_end: int  # event index where the backward starts

    def row_bytes(self, sizes: Sizes, sequence_parallel: bool = False) -> np.ndarray:
        """Bytes of every recorded storage at `sizes`, the SP and CP rules applied."""
        vals = sizes.values()
        logv = np.log(np.array([float(vals[k]) for k in SYMBOLS]))
        out = self.itemsize * self.constant * np.exp(self.exponents @ logv)
        symbolic = self.exponents.sum(axis=1) > 0
        out = np.where(symbolic, out, self.measured_bytes)
        if sequence_parallel and sizes.tp > 1:
            idx = {k: i for i, k in enumerate(SYMBOLS)}
            tokens = (self.exponents[:, idx["s"]] > 0) | (self.exponents[:, idx["n"]] > 0)
            hidden = self.exponents[:, idx["h"]] > 0
            sharded = self.exponents[:, [idx[k] for k in TP_SHARDED]].sum(axis=1) > 0
            in_sp = np.isin(self.region, [REGIONS.index(r) for r in SP_REGIONS])
            out = np.where(tokens & hidden & ~sharded & in_sp, out / sizes.tp, out)
        return out

    def weights(self, layers: int, first: bool, last: bool) -> np.ndarray:
        """How many times each storage counts in a chunk of `layers` layers (with the embedding when
        `first`, the final norm, output layer and loss when `last`)."""
        w = np.ones(len(self.region))
        reg = self.region
        w[reg == REGIONS.index("embedding")] = 1.0 if first else 0.0
        for r in HEAD_REGIONS:
            w[reg == REGIONS.index(r)] = 1.0 if last else 0.0
        w[reg == REGIONS.index("layer0")] = 1.0 if layers >= 1 else 0.0
        held1 = (reg == REGIONS.index("layer1")) & self.held_at_forward_end()
        w[held1] = max(layers - 1, 0)
        return w

    def held_at_forward_end(self) -> np.ndarray:
        """[R] bool: the storage is alive when the backward starts (what a layer keeps for it)."""
        alive = np.zeros(len(self.region), dtype=bool)
        head = self.events[: self.forward_end]
        made = head[head > 0] - 1
        gone = -head[head < 0] - 1
        alive[made] = True
        alive[gone] = False
        return alive

    def timeline(self, sizes: Sizes, layers: int, first: bool, last: bool, sequence_parallel: bool = False) -> dict:
        """Peak bytes of one micro-batch through one chunk at `sizes`, with its split at the peak
        (activations: what the forward of the embedding and layers made; output: the final norm,
        output layer and loss; transient: what the backward made; fixed: what was made outside
        those, e.g. the rotary table and the Float16Module's casts), and `held`: what the chunk's
        forward leaves alive for its backward (an in-flight micro-batch of a pipeline)."""
        nbytes = self.row_bytes(sizes, sequence_parallel) * self.weights(layers, first, last)
        rows = np.abs(self.events) - 1
        delta = np.where(self.events > 0, nbytes[rows], -nbytes[rows])
        live = np.cumsum(delta)
        at = int(np.argmax(live))
        head = np.isin(self.region, [REGIONS.index(r) for r in HEAD_REGIONS])
        other = self.region == REGIONS.index("other")
        cats = {
            "activations": ~self.backward & ~head & ~other,
            "output": ~self.backward & head,
            "transient": self.backward,
            "fixed": ~self.backward & other,
        }
        split = {}
        for name, mask in cats.items():
            d = np.where(mask[rows], delta, 0.0)
            split[name] = float(np.cumsum(d)[at])
        end = self.forward_end - 1
        held_mask = ~self.backward & ~head & ~other & self.held_at_forward_end()
        held = float(np.cumsum(np.where(held_mask[rows], delta, 0.0))[end]) if end >= 0 else 0.0
        return {"peak": float(live[at]), **split, "held": held, "at_event": at, "in_backward": at >= self.forward_end}

    def saved_per_layer(self, sizes: Sizes, sequence_parallel: bool = False) -> float:
        """Bytes one layer saves for backward (layer 1 of the measurement, at `sizes`)."""
        mask = (self.region == REGIONS.index("layer1")) & ~self.backward & self.saved
        return float(self.row_bytes(sizes, sequence_parallel)[mask].sum())


# --- the measurement ---------------------------------------------------------------------------


def symbol_table(sizes: Sizes, strict: bool = True) -> dict[int, str]:
    """size -> symbol at the measured sizes (sizes of 1 are no axis); `strict`: two symbols of one
    size are an error, else the first in SYMBOLS keeps it (the layout checks' own measurements)."""
    table: dict[int, str] = {}
    values = sizes.values()
    for name in SYMBOLS:
        value = values[name]
        if (name in CP_ONLY and sizes.cp == 1) or value == 1:
            continue
        if value in table:
            if strict:
                raise ValueError(f"measurement sizes collide: {name} and {table[value]} are both {value}")
            continue
        table[value] = name
    return table


def _monomial(shape, table: dict[int, str]) -> tuple[list[int], float]:
    powers = [0] * len(SYMBOLS)
    const = 1.0
    for d in shape:
        if d == 1:
            continue
        name = table.get(int(d))
        if name is None:
            const *= d
        else:
            powers[SYMBOLS.index(name)] += 1
    return powers, const


def small_config(structure: Structure, at: dict | None = None):
    """The SodaConfig of the measured model: MEASURE's sizes (or `at`), the structure's settings."""
    from megatron_soda.config import SodaConfig

    at = {**MEASURE, **(at or {})}
    cfg = SodaConfig()
    m = cfg.model
    m.hidden_size, m.num_layers, m.head_dim = at["h"], 2, at["hd"]
    m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size = at["heads"], at["groups"], at["ffn"]
    m.vocab_size, m.vocab_pad_multiple, m.ce_chunk_tokens = at["vocab"], at["vocab_pad"], at["chunk"]
    m.transformer_impl = "local"
    m.embedding_impl, m.output_impl = structure.embedding, structure.output
    m.norm_impl, m.rope_impl, m.wgrad_impl = structure.norm, structure.rope, structure.wgrad
    p = cfg.parallel
    p.tp, p.cp, p.sequence_parallel, p.recompute = (
        structure.tp,
        structure.cp,
        structure.sequence_parallel,
        structure.recompute,
    )
    p.cuda_graph = "none"
    cfg.train.seq_length, cfg.train.micro_batch_size = at["s"], at["b"]
    cfg.optim.lr = 1e-3
    return cfg


@functools.lru_cache(maxsize=64)
def measure(structure: Structure, at: tuple[tuple[str, int], ...] = ()) -> Footprint:
    """Record one micro-batch of the small model of `structure` (at MEASURE's sizes, or those in
    `at`): see the module docstring. Seconds on a CPU; cached per structure in this process."""
    from megatron_soda.tools.plan.session import fake_session, import_megatron

    import_megatron()
    cfg = small_config(structure, dict(at))
    world = structure.tp * structure.cp
    with fake_session(world, 0, tp=structure.tp, cp=structure.cp):
        return _record(cfg, structure)


def _record(cfg, structure: Structure) -> Footprint:
    import gc
    import weakref

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_soda.model.fast_paths import FastPaths, install
    from megatron_soda.model.gpt import build_model
    from megatron_soda.tokenization.vocab import SodaLayout
    from megatron_soda.training.trainer import make_forward_step

    m, t = cfg.model, cfg.train
    fp = FastPaths(
        embedding=structure.embedding,
        output=structure.output,
        norm=structure.norm,
        rope=structure.rope,
        wgrad=structure.wgrad,
    )
    install(fp)
    (model,), _ = build_model(m, cfg.parallel, torch.bfloat16, cuda=False, fp=fp)
    config = model.config
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=Float16Module(config, model),
    )
    layout = SodaLayout(**SMALL_LAYOUT)
    forward_step = make_forward_step(cfg, layout, "cpu", fp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, layout.vocab_size, (t.micro_batch_size, t.seq_length + 1), generator=g)
    batch = {
        "tokens": ids[:, :-1].contiguous(),
        "labels": ids[:, 1:].contiguous(),
        "loss_mask": torch.ones(ids[:, 1:].shape),
    }

    sizes = sizes_of(m, t.seq_length, t.micro_batch_size, structure.tp, structure.cp)
    table = symbol_table(sizes, strict=structure.tp == 1)
    keep = [p.untyped_storage() for p in ddp.parameters()]
    keep += [b.grad_data.untyped_storage() for b in ddp.buffers]
    keep += [v.untyped_storage() for v in batch.values()]
    keep += [b.untyped_storage() for b in model.buffers()]
    before = {id(s) for s in keep}  # alive throughout (held by `keep`): never recorded

    # where we are: module regions (a stack), and the autograd sequence numbers each region's nodes got
    stack: list[str] = ["other"]
    bounds: list[tuple[int, str]] = []  # (first autograd sequence number, region) at each region change

    def seq_now() -> int:
        with torch.enable_grad():
            return torch.zeros(1, requires_grad=True).view(1).grad_fn._sequence_nr()

    last_layer = ["other"]  # the layer entered last: megatron's checkpoint saves a layer's input after it ran

    def enter(region: str) -> None:
        if region in LAYER_REGIONS:
            last_layer[0] = region
        stack.append(region)
        bounds.append((seq_now(), region))

    def leave() -> None:
        stack.pop()
        bounds.append((seq_now(), stack[-1]))

    for name, module in model.named_modules():
        region = None
        if name == "embedding":
            region = "embedding"
        elif name.startswith("decoder.layers.") and name.count(".") == 2:
            region = f"layer{min(int(name.split('.')[2]), 1)}"
        elif name == "decoder.final_layernorm":
            region = "final_norm"
        elif name == "output_layer":
            region = "output"
        if region is not None:
            module.register_forward_pre_hook(lambda mod, args, r=region: enter(r))
            module.register_forward_hook(lambda mod, args, out: leave())

    rows: list[tuple] = []
    events: list[int] = []
    live: dict[int, int] = {}  # id(storage) -> row, while the storage lives
    saved_rows: set[int] = set()
    owner: dict[int, str] = {}  # row -> the region that first saved it for backward
    phase = {"backward": False}

    def region_now() -> str:
        if not phase["backward"] or len(stack) > 1:  # forward, or a recomputation inside backward
            return stack[-1]
        node = torch._C._current_autograd_node()  # backward: the region whose forward made this node
        if node is None:
            return "other"
        seq, found = node._sequence_nr(), "other"
        for first, region in bounds:
            if first > seq:
                break
            found = region
        return found

    def freed(key: int, rid: int) -> None:
        live.pop(key, None)
        events.append(-(rid + 1))

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in out if isinstance(out, (tuple, list)) else (out,):
                if not isinstance(x, torch.Tensor) or x.device.type == "meta":
                    continue
                st = x.untyped_storage()
                key = id(st)
                if st.nbytes() == 0 or key in before or key in live:
                    continue
                region = region_now()
                powers, const = _monomial(x.shape, table)
                numel = max(1, st.nbytes() // x.element_size())
                shape_numel = math.prod(x.shape)
                if shape_numel and numel != shape_numel:  # a view of a larger new buffer
                    const *= numel / shape_numel
                if numel < MIN_SYMBOLIC:
                    powers, const = [0] * len(SYMBOLS), float(numel)
                rid = len(rows)
                rows.append((powers, const, x.element_size(), st.nbytes(), region, phase["backward"]))
                live[key] = rid
                events.append(rid + 1)
                weakref.finalize(st, freed, key, rid)
            return out

    def pack(x):
        rid = live.get(id(x.untyped_storage()))
        if rid is not None and rid not in saved_rows:
            saved_rows.add(rid)
            region = region_now()
            if region == "other" and not phase["backward"]:  # full recompute: the checkpoint of the layer just run
                region = last_layer[0]
            owner[rid] = region  # a layer's saved input is that layer's: weighted with it
        return x

    import torch.nn.attention.bias as bias
    from torch.utils._python_dispatch import _disable_current_modes

    lower_right = bias.causal_lower_right

    def causal_lower_right(*args):  # a tensor subclass cannot be made under a dispatch mode
        with _disable_current_modes():
            return lower_right(*args)

    bias.causal_lower_right = causal_lower_right
    try:
        with Tracker(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            output, loss_func = forward_step(iter([batch]), ddp)
            enter("loss")
            loss = loss_func(output)[0]
            del output  # as megatron's schedule: the model output lives on only where the loss saved it
            leave()
            forward_end = len(events)
            phase["backward"] = True
            loss.backward()
            del loss, loss_func
        gc.collect()
    finally:
        bias.causal_lower_right = lower_right
    n = len(rows)
    exponents = np.array([r[0] for r in rows], dtype=float).reshape(n, len(SYMBOLS))
    backward = np.array([r[5] for r in rows], dtype=bool)
    return Footprint(
        structure=structure,
        measured_at=sizes,
        exponents=exponents,
        constant=np.array([r[1] for r in rows], dtype=float),
        itemsize=np.array([r[2] for r in rows], dtype=float),
        measured_bytes=np.array([r[3] for r in rows], dtype=float),
        region=np.array([REGIONS.index(owner.get(i, r[4])) for i, r in enumerate(rows)], dtype=int),
        backward=backward,
        saved=np.isin(np.arange(n), sorted(saved_rows)),
        events=np.array(events, dtype=np.int64),
        forward_end=forward_end,
    )


def replace(structure: Structure, **kw) -> Structure:
    return dataclasses.replace(structure, **kw)
