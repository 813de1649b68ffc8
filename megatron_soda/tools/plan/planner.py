"""One layout's predicted memory and time, and the layouts of a job ranked (docs/PLAN.md).

Memory per rank = weights + gradients + optimizer state (shapes.py: the model's own parameters,
split by TP / PP, the DDP buffer and the distributed optimizer's shard over DP x CP) + the measured
micro-batch timeline (footprint.py) at this layout's sizes, with the activations of the other
micro-batches a pipeline stage holds at its peak; or, where larger, the state plus the optimizer
step's own working memory (foreach AdamW's square-root temporaries). Time: timing.py.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from megatron_soda.tools.plan import comm, footprint, shapes, timing
from megatron_soda.tools.plan.layout import Layout, Run

GIB = float(2**30)
TIGHT = 0.10  # the memory model's accuracy band (tests/test_plan.py holds it to every measured row)


@dataclass
class Memory:
    """Bytes per rank at the peak of the worst pipeline rank, by what holds them."""

    stage: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    output: float
    transient: float
    fixed: float
    optimizer_step: float  # the optimizer step's working memory (peak = state + it, if that is larger)
    in_flight: int  # micro-batch chunks whose activations the stage holds at its peak

    @property
    def state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> float:
        return self.state + max(self.activations + self.output + self.transient + self.fixed, self.optimizer_step)

    def gib(self) -> dict:
        d = {k: v / GIB for k, v in dataclasses.asdict(self).items() if isinstance(v, float)}
        return {"stage": self.stage, "in_flight": self.in_flight, **d, "peak": self.peak / GIB}


@dataclass
class Prediction:
    layout: Layout
    memory: Memory
    usable_gib: float
    time: timing.StepTime
    tokens_per_s_per_gpu: float
    mfu: float
    collectives: dict[int, list]  # pipeline rank -> its step's collectives

    @property
    def fits(self) -> bool:
        """The peak plus the memory model's accuracy band is within the usable memory."""
        return self.memory.peak / GIB * (1 + TIGHT) <= self.usable_gib

    @property
    def tight(self) -> bool:
        """Fits the prediction, not its band: may run out of memory."""
        return not self.fits and self.memory.peak / GIB <= self.usable_gib

    @property
    def verdict(self) -> str:
        return "yes" if self.fits else "tight" if self.tight else "no"


_MODELS: dict = {}  # model key -> ModelConfig (the cache below is keyed by the hashable key)


@functools.lru_cache(maxsize=4096)
def _stage(mkey, tp, pp, vpp, dpcp, rank, distopt, overlap):
    return shapes.stage_state(_MODELS[mkey], tp, pp, vpp, dpcp, rank, distopt, overlap)


class Planner:
    """Predictions for one run config (its model, sequence, global batch and speed switches) on one
    GPU type; `fast_paths`: the switches to assume (default: what `auto` picks on a GPU)."""

    def __init__(
        self,
        cfg,
        gpu: timing.GPU,
        calibration: timing.Calibration,
        gpus_per_node: int = 8,
        intra_gbs: float = 0.0,
        inter_gbs: float = 0.0,
        fast_paths=None,
        memory_gib: float = 0.0,
        fixed: dict | None = None,
    ) -> None:
        from megatron_soda.model.fast_paths import resolve_fast_paths
        from megatron_soda.tools.plan.layout import run_of

        self.cfg, self.gpu, self.cal = cfg, gpu, calibration
        self.fast_paths = fast_paths or resolve_fast_paths(cfg, True)
        base = run_of(cfg, cuda=True)
        self.run: Run = dataclasses.replace(base, embedding=self.fast_paths.embedding, output=self.fast_paths.output)
        self.gpus_per_node = gpus_per_node
        self.intra = intra_gbs or gpu.intra_gbs
        self.inter = inter_gbs or gpu.inter_gbs
        self.usable_gib = (memory_gib or gpu.memory_gib) - timing.RESERVED_GIB
        self.fixed = dict(fixed or {})  # layout settings the user set: only layouts with them are tried
        self.mkey = shapes.model_key(cfg.model)
        _MODELS[self.mkey] = cfg.model

    # --- memory --------------------------------------------------------------------------------

    def footprint(self, recompute: str, cp: int = 1) -> footprint.Footprint:
        """The measured micro-batch of this run's kind: at TP 1 (TP and SP are scaling rules) and
        at CP 1, or at CP 2 for a layout with CP (footprint.py)."""
        fp = self.fast_paths
        return footprint.measure(
            footprint.Structure(
                embedding=fp.embedding,
                output=fp.output,
                norm=fp.norm,
                rope=fp.rope,
                wgrad=fp.wgrad,
                recompute=recompute,
                cp=1 if cp == 1 else 2,
            )
        )

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one Planner per job
    def _timeline(self, recompute, micro_batch, tp, cp, sp, layers, first, last) -> dict:
        sizes = footprint.sizes_of(self.cfg.model, self.run.seq, micro_batch, tp, cp)
        return self.footprint(recompute, cp).timeline(sizes, layers, first, last, sp)

    def stages(self, lay: Layout) -> list[shapes.StageState]:
        """The first and the last pipeline rank (the others hold the first's layers, fewer in flight)."""
        ranks = sorted({0, lay.pp - 1})
        args = (lay.tp, lay.pp, lay.vpp, lay.dp * lay.cp)
        return [_stage(self.mkey, *args, r, lay.distributed_optimizer, lay.overlap_grad_reduce) for r in ranks]

    def memory(self, lay: Layout, stages: list[shapes.StageState] | None = None) -> Memory:
        run = self.run
        stages = stages or self.stages(lay)
        M = run.micro_batches(lay)
        worst = None

        def line(layers: int, first: bool, last: bool) -> dict:
            return self._timeline(
                lay.recompute, lay.micro_batch, lay.tp, lay.cp, lay.sequence_parallel, layers, first, last
            )

        for st in stages:
            k = timing.in_flight(lay, st.rank, M)
            top = max((line(c.layers, c.first, c.last) for c in st.chunks), key=lambda x: x["peak"])
            held = line(st.chunks[0].layers, False, False)["held"] if lay.vpp > 1 else top["held"]
            params, buffer = st.params, st.buffer
            opt_elems = buffer / (lay.dp * lay.cp) if lay.distributed_optimizer else params
            mem = Memory(
                stage=st.rank,
                weights=params * run.param_bytes,
                gradients=buffer * 4.0,
                optimizer=opt_elems * 12.0,  # fp32 main weights + Adam's two moments
                activations=top["activations"] + (k - 1) * held,
                output=top["output"],
                transient=top["transient"],
                fixed=top["fixed"],
                optimizer_step=opt_elems * 4.0 if self.fast_paths.adam == "foreach" else 0.0,
                in_flight=k,
            )
            if worst is None or mem.peak > worst.peak:
                worst = mem
        return worst

    # --- one layout ----------------------------------------------------------------------------

    def predict(self, lay: Layout) -> Prediction:
        stages = self.stages(lay)
        mem = self.memory(lay, stages)
        colls = {st.rank: comm.step_collectives(self.run, lay, st) for st in stages}
        t = timing.step_time(
            self.run, lay, stages, colls, self.cal, self.gpu, self.gpus_per_node, self.intra, self.inter
        )
        tps = timing.tokens_per_s_per_gpu(self.run, lay, t.step_s)
        return Prediction(lay, mem, self.usable_gib, t, tps, timing.mfu(self.run, tps, self.gpu), colls)

    # --- the job -------------------------------------------------------------------------------

    def candidates(self, gpus: int, micro_batches=(1, 2, 4, 8, 16)) -> list[tuple[Layout, ...]]:
        """Every layout the config's checks accept on `gpus` ranks, over TP (within a node), PP,
        VPP, CP, DP and the micro-batch, each with its memory levers in the order they cost time:
        (recompute none, selective, full) x (distributed optimizer off, on). SP is on whenever
        TP > 1 (it only saves memory: its all-gathers and reduce-scatters move an all-reduce's
        bytes), overlap_grad_reduce whenever there is DP."""
        m, t = self.cfg.model, self.cfg.train
        out = []
        for tp in (1, 2, 4, 8):
            if tp > min(self.gpus_per_node, gpus) or m.num_attention_heads % tp or m.num_query_groups % tp:
                continue
            if m.ffn_hidden_size % tp or m.vocab_pad_multiple % (128 * tp):
                continue
            if tp > 1 and self.cfg.optim.cautious:
                continue
            for cp in (1, 2, 4, 8):
                if cp > 1 and (t.seq_length % (2 * cp) or m.transformer_impl == "transformer_engine"):
                    continue
                if tp > 1 and (t.seq_length // cp) % tp:
                    continue
                for pp in [d for d in range(1, min(m.num_layers, 16) + 1) if m.num_layers % d == 0]:
                    if gpus % (tp * cp * pp):
                        continue
                    dp = gpus // (tp * cp * pp)
                    for vpp in (1, 2) if pp > 1 else (1,):
                        if m.num_layers % (pp * vpp):
                            continue
                        for mb in micro_batches:
                            if t.global_batch_size % (mb * dp):
                                continue
                            if vpp > 1 and (t.global_batch_size // (mb * dp)) % pp:
                                continue
                            levers = []
                            for rc in ("none", "selective", "full"):
                                for distopt in (False, True) if dp * cp > 1 else (False,):
                                    if distopt and self.cfg.optim.cautious:
                                        continue
                                    lay = Layout(tp, pp, vpp, cp, dp, mb, rc, distopt, tp > 1, dp * cp > 1)
                                    if self.allowed(lay):
                                        levers.append(lay)
                            if levers:
                                out.append(tuple(levers))
        return out

    def allowed(self, lay: Layout) -> bool:
        """Whether the layout keeps every layout setting the user fixed (`fixed`: key -> value)."""
        return all(getattr(lay, k) == v for k, v in self.fixed.items())

    def config_for(self, lay: Layout):
        """The run config with this layout's settings (what `soda train` would run)."""
        from megatron_soda.config import config_from_dict

        values = self.cfg.to_dict()
        for section, kv in lay.overrides().items():
            values[section].update(kv)
        return config_from_dict(values)

    def plan(self, gpus: int, top: int = 0) -> list[Prediction]:
        """Per layout the fastest memory levers that fit with the model's margin (or, where none do,
        the one with the least memory); those that fit first, fastest first, then the rest by peak.
        The first `top` (0: all) are checked with the config's own `validate`."""
        from megatron_soda.config import ConfigError, validate

        chosen = []
        for levers in self.candidates(gpus):
            best = None
            for lay in levers:
                pred = self.predict(lay)
                if pred.fits:
                    best = pred
                    break
                if best is None or pred.memory.peak < best.memory.peak:
                    best = pred
            chosen.append(best)
        fit = sorted((p for p in chosen if p.fits), key=lambda p: (-p.tokens_per_s_per_gpu, p.memory.peak))
        rest = sorted((p for p in chosen if not p.fits), key=lambda p: p.memory.peak)
        out = []
        for pred in fit + rest:
            if top and len(out) >= top:
                break
            try:
                validate(self.config_for(pred.layout), gpus, need_data=False)
            except ConfigError:
                continue
            out.append(pred)
        return out
