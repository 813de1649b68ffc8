"""`soda bench kernels`: fused kernels vs the reference paths, forward + backward, same run.

Every candidate is timed as the training step uses it, weight gradient included: the weights carry
megatron's fp32 `main_grad`, our kernels add into it directly (gradient-accumulation fusion) and the
others produce a bf16 gradient that is then added to it, as megatron's DDP hook does.
Embedding: fused lookup vs torch's F.embedding path and megatron-core's VocabParallelEmbedding.
Output layer: our fused linear + cross-entropy (the training path: gradients computed in the
forward), our blockwise kernel (no logits in memory; exact, and with cut-cross-entropy's gradient
filter: `blockwise+filter`) vs torch linear + F.cross_entropy and megatron-core's
vocab_parallel_cross_entropy, and
the well-kept peers when installed (Liger-Kernel's fused linear cross-entropy, Apple's
cut-cross-entropy), twice: on random inputs (`ce`: near-uniform logits, which flatter a kernel that
skips small gradients, as cut-cross-entropy's default does) and in the fair race (`race`: inputs
whose logits have a trained model's entropy per token type, `race_inputs`; cut-cross-entropy in its
default and in its exact setting). RMSNorm (hidden states and QK-norm shapes): ours vs torch (and
Liger's). RoPE: ours vs megatron-core's unfused path. Time ratios everywhere; peak-memory ratios on
GPU (torch.cuda.max_memory_allocated). On CPU the kernels run in Triton's interpreter and the GPU
peers are skipped with a note: the numbers then only show that the benchmark works.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import megatron_soda  # noqa: F401  (Triton interpreter switch before Triton is imported)
from megatron_soda.config import CCE_FILTER_EPS, UserError
from megatron_soda.tools.bench import write_json

if TYPE_CHECKING:
    import torch

SODA_VOCAB = 144_644
BLOCKWISE = (("blockwise", 0.0), ("blockwise+filter", CCE_FILTER_EPS))  # candidate name, filter_eps


def _timeit(fn, reps: int, cuda: bool) -> tuple[float, float]:
    import torch

    fn()  # warm-up / compile
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / reps
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return dt, peak


def _megatron_session() -> None:
    """A one-process group (megatron's layers need one), set up as every run's is."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_soda.parallel.setup import init_distributed

    if not dist.is_initialized():
        init_distributed("cuda" if torch.cuda.is_available() else "cpu")
        ps.initialize_model_parallel(1, 1)


def _with_main_grad(w: torch.Tensor) -> torch.Tensor:
    """Give a weight megatron DDP's fp32 gradient buffer and flag."""
    import torch

    w.main_grad = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    w.grad_added_to_main_grad = False
    return w


def _ddp_hook(*weights: torch.Tensor) -> None:
    """What megatron's DDP does after backward: add a produced gradient into main_grad, drop it."""
    for w in weights:
        if w.grad is not None and not w.grad_added_to_main_grad:
            w.main_grad.add_(w.grad)
        w.grad = None
        w.grad_added_to_main_grad = False


def bench_embedding(hidden: int, tokens: int, vocab: int, reps: int, dev: str, dtype) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_soda.kernels.codec_embedding import fused_embedding

    cuda = dev.startswith("cuda")
    ids32 = torch.randint(0, vocab, (tokens,), device=dev, dtype=torch.int32)
    ids = ids32.long()
    w = _with_main_grad(torch.randn(vocab, hidden, device=dev, dtype=dtype, requires_grad=True))
    g = torch.randn(tokens, hidden, device=dev, dtype=dtype)
    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=hidden,
        num_attention_heads=1,
        use_cpu_initialization=not cuda,
        params_dtype=dtype,
        perform_initialization=False,
    )
    mc = VocabParallelEmbedding(
        vocab, hidden, init_method=torch.nn.init.zeros_, config=cfg, reduce_scatter_embeddings=False
    )
    _with_main_grad(mc.weight)

    def fused():
        fused_embedding(ids32, w, 0, vocab, into_main_grad=True).backward(g)
        _ddp_hook(w)

    def torch_ref():
        F.embedding(ids, w).backward(g)
        _ddp_hook(w)

    def megatron():
        mc(ids).backward(g)
        _ddp_hook(mc.weight)

    rows = {}
    for name, fn in (("fused", fused), ("torch", torch_ref), ("megatron-core", megatron)):
        rows[name] = _timeit(fn, reps, cuda)
    return rows


def bench_ce(hidden: int, tokens: int, vocab: int, reps: int, dev: str, dtype, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_soda.kernels.blockwise_ce import blockwise_linear_cross_entropy
    from megatron_soda.kernels.fused_ce import fused_linear_cross_entropy

    cuda = dev.startswith("cuda")
    h = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
    w = _with_main_grad((torch.randn(vocab, hidden, device=dev, dtype=dtype) * 0.02).requires_grad_(True))
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    ones = torch.ones(tokens, device=dev)

    def fused():  # the training path: sum of token losses, gradients computed in the forward
        _, _, loss = fused_linear_cross_entropy(
            h, w, labels, 0, vocab, chunk=chunk, loss_weight=ones, into_main_grad=True
        )
        loss.backward()
        _ddp_hook(w)

    def blockwise(filter_eps: float):
        def run():
            blockwise_linear_cross_entropy(
                h, w, labels, 0, vocab, loss_weight=ones, into_main_grad=True, filter_eps=filter_eps
            )[2].backward()
            _ddp_hook(w)

        return run

    def torch_ref():
        F.cross_entropy((h @ w.t()).float(), labels, reduction="sum").backward()
        _ddp_hook(w)

    def megatron():
        logits = (h @ w.t()).float()
        vocab_parallel_cross_entropy(logits[:, None, :], labels[:, None]).sum().backward()
        _ddp_hook(w)

    cands = [("fused", fused), *[(name, blockwise(eps)) for name, eps in BLOCKWISE]]
    cands += [("torch", torch_ref), ("megatron-core", megatron)]
    if cuda:  # the peers are GPU-only (Triton kernels compiled for CUDA)
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

            def liger_fn():
                liger(w, h, labels).backward()
                _ddp_hook(w)

            cands.append(("liger-kernel", liger_fn))
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy

            def cce_fn():
                linear_cross_entropy(h, w, labels, reduction="sum").backward()
                _ddp_hook(w)

            cands.append(("cut-cross-entropy", cce_fn))
        except ImportError:
            pass
    return {name: _timeit(fn, reps, cuda) for name, fn in cands}


# --- the fair CE race ----------------------------------------------------------------------------

# What the race's logits are calibrated to: a trained model's mean NLL per token type (nats), and
# each type's share of the tokens. No committed row holds a trained SODA run's per-modality loss
# (docs/bench's training rows are benchmark steps on random ids, 6-12 nats; docs/isoflop's runs are
# toy models), so every number here is an assumption, stated with its reason:
# - text 3.0: 0.1-4B LMs on web text under Llama-3's tokenizer train to roughly 2.3-3.3 nats per
#   token; the middle of the 2.5-3.5 the race was asked for;
# - Mimi codebooks 0..7 (2048 codes each; uniform = ln 2048 = 7.62): codebook 0 (semantic, distilled
#   from WavLM) is the most predictable, each residual level less so: 4.5 rising to 6.5;
# - shares: speech-heavy batches, 1/4 text, 3/4 audio (Mimi: 12.5 frames/s x 8 codes = 100 audio
#   tokens per second of speech against ~3 text tokens), audio evenly over the codebooks.
RACE_TARGETS = {  # token type: (share of tokens, target mean NLL in nats)
    "text": (0.25, 3.0),
    **{f"audio_cb{k}": (0.75 / 8, nats) for k, nats in enumerate((4.5, 5.2, 5.6, 5.9, 6.1, 6.3, 6.4, 6.5))},
}
RACE_MIN_VOCAB = 16_390  # 8 x 2048 audio ids, 4 delimiters and some text
RACE_PERIOD = 1024  # token layout: every 1024 tokens, 256 of text then 96 audio frames (codebooks 0..7 in turn)
RACE_SHIFT = 12.0  # nats by which a token's own type's ids are raised, and the others' lowered (mass stays in range)
RACE_CALIBRATION_ROWS = 512  # rows per type the noise scale is fitted on


def race_layout(vocab: int):
    """The SODA token layout at this vocabulary size (the audio block as in the real one)."""
    from megatron_soda.tools.bench.train import bench_layout

    return bench_layout(vocab)


def race_types(tokens: int, codebooks: int = 8) -> torch.Tensor:
    """Token type per position (0 = text, 1 + k = codebook k), laid out as real sequences are: runs
    of text, then audio frame-major (k = 0..7 in turn), RACE_TARGETS' shares in every period."""
    import torch

    period = min(RACE_PERIOD, tokens)
    n_text = round(period * RACE_TARGETS["text"][0])
    one = torch.cat([torch.zeros(n_text, dtype=torch.long), 1 + torch.arange(period - n_text) % codebooks])
    return one.repeat(-(-tokens // period))[:tokens]


def _id_types(layout) -> torch.Tensor:
    """Type per vocabulary id (text and the delimiters: 0; codebook k: 1 + k)."""
    import torch

    t = torch.zeros(layout.vocab_size, dtype=torch.long)
    for k in range(layout.codebooks):
        lo = layout.audio_offset + k * layout.codebook_size
        t[lo : lo + layout.codebook_size] = 1 + k
    return t


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _row_entropy(h, w, chunk: int = 512) -> torch.Tensor:
    import torch

    return torch.cat([_entropy(h[i : i + chunk].float() @ w.float().t()) for i in range(0, h.shape[0], chunk)])


def race_inputs(tokens: int, hidden: int, vocab: int, dev: str, dtype, seed: int = 0) -> dict:
    """Hidden states [tokens, hidden], an output weight [vocab, hidden] and labels whose logits have,
    per token type, the mean entropy RACE_TARGETS asks for (and labels drawn from those softmaxes,
    so the mean NLL matches it too, up to sampling noise), with a trained model's structure: a
    token's probability mass sits in its own type's id range (one hidden dimension per type raises
    that range by RACE_SHIFT and lowers the others' by as much), text ids carry a Zipf prior over
    their ids (BPE ids run roughly by frequency: -log(1 + id), one more dimension), and the
    context-dependent part is Gaussian in the remaining dimensions, its scale per type found by
    bisection on the mean entropy of up to RACE_CALIBRATION_ROWS rows of that type (the hidden
    states' rounding to `dtype` comes after: the report gives the entropy and NLL of the rounded
    inputs, as the kernels see them). -> {hidden, weight, labels, types, report: {type: {tokens,
    target, entropy, nll}}}."""
    import torch

    layout = race_layout(vocab)
    n_types = 1 + layout.codebooks
    if hidden < n_types + 1 + 16:
        raise ValueError(f"race inputs need hidden >= {n_types + 17}, got {hidden}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    id_type = _id_types(layout)
    prior = torch.where(id_type == 0, -torch.log1p(torch.arange(vocab, dtype=torch.float32)), torch.zeros(vocab))
    noise_dims = hidden - n_types - 1
    w = torch.randn(vocab, hidden, generator=g) / noise_dims**0.5
    w[:, :n_types] = torch.nn.functional.one_hot(id_type, n_types).float()
    w[:, n_types] = prior
    types = race_types(tokens, layout.codebooks)
    base = torch.zeros(tokens, hidden)
    base[:, :n_types] = -RACE_SHIFT
    base[torch.arange(tokens), types] = RACE_SHIFT
    base[:, n_types] = 1.0
    noise = torch.zeros(tokens, hidden)
    noise[:, n_types + 1 :] = torch.randn(tokens, noise_dims, generator=g)
    w = w.to(dev, dtype)
    base, noise = base.to(dev), noise.to(dev)
    h = torch.empty(tokens, hidden, device=dev, dtype=dtype)
    report = {}
    for k, (_, target) in enumerate(RACE_TARGETS.values()):
        rows = (types == k).nonzero()[:, 0].to(dev)
        if not len(rows):
            continue
        fit = rows[:RACE_CALIBRATION_ROWS]
        wf = w.float().t()
        zb, zn = base[fit].to(dtype).float() @ wf, noise[fit] @ wf  # logits = zb + scale * zn (before rounding h)
        lo, hi = 0.0, 16.0
        for _ in range(30):  # entropy falls as the context part grows
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _entropy(zb + mid * zn).mean().item() > target else (lo, mid)
        h[rows] = (base[rows] + (lo + hi) / 2 * noise[rows]).to(dtype)
    labels = torch.empty(tokens, dtype=torch.long, device=dev)
    gd = torch.Generator(device=dev).manual_seed(seed + 1)
    for i in range(0, tokens, 4096):  # labels ~ softmax(logits): Gumbel-max, a chunk at a time
        z = h[i : i + 4096].float() @ w.float().t()
        gumbel = -torch.log(-torch.log(torch.rand(z.shape, generator=gd, device=dev).clamp_(1e-20, 1.0)))
        labels[i : i + 4096] = (z + gumbel).argmax(-1)
    ent = _row_entropy(h, w)
    nll = torch.cat(
        [
            torch.nn.functional.cross_entropy(
                h[i : i + 512].float() @ w.float().t(), labels[i : i + 512], reduction="none"
            )
            for i in range(0, tokens, 512)
        ]
    )
    types_dev = types.to(dev)
    for k, (name, (_, target)) in enumerate(RACE_TARGETS.items()):
        mine = types_dev == k
        if mine.any():
            report[name] = {
                "tokens": int(mine.sum()),
                "target": target,
                "entropy": float(ent[mine].mean()),
                "nll": float(nll[mine].mean()),
            }
    return {"hidden": h, "weight": w, "labels": labels, "types": types, "report": report}


def bench_ce_race(hidden: int, tokens: int, vocab: int, reps: int, dev: str, dtype, chunk: int) -> tuple[dict, dict]:
    """The fair race: ours vs torch, megatron-core, Liger-Kernel and cut-cross-entropy (default
    `filter_eps`, which skips gradient blocks whose softmax entries are all below it, and
    `filter_eps=None`, its exact setting for pretraining) on `race_inputs`, each as a sum of token
    losses with its gradients. -> ({impl: (seconds, peak MiB)}, {"inputs": per-type report,
    "mean_nll": {impl: its loss / tokens}, "skipped": {impl: why}})."""
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_soda.kernels.blockwise_ce import blockwise_linear_cross_entropy
    from megatron_soda.kernels.fused_ce import fused_linear_cross_entropy

    cuda = dev.startswith("cuda")
    inp = race_inputs(tokens, hidden, vocab, dev, dtype)
    h = inp["hidden"].requires_grad_(True)
    w = _with_main_grad(inp["weight"].requires_grad_(True))
    labels = inp["labels"]
    ones = torch.ones(tokens, device=dev)
    losses: dict[str, torch.Tensor] = {}

    def timed(name, loss_fn):
        def run():
            loss = loss_fn()
            loss.backward()
            _ddp_hook(w)
            h.grad = None
            losses.setdefault(name, loss.detach())  # the warm-up's; read after the timing (no sync inside it)

        return name, run

    cands = [
        timed(
            "fused",
            lambda: fused_linear_cross_entropy(
                h, w, labels, 0, vocab, chunk=chunk, loss_weight=ones, into_main_grad=True
            )[2],
        ),
        *[
            timed(
                name,
                lambda eps=eps: blockwise_linear_cross_entropy(
                    h, w, labels, 0, vocab, loss_weight=ones, into_main_grad=True, filter_eps=eps
                )[2],
            )
            for name, eps in BLOCKWISE
        ],
        timed("torch", lambda: F.cross_entropy((h @ w.t()).float(), labels, reduction="sum")),
        timed(
            "megatron-core",
            lambda: vocab_parallel_cross_entropy((h @ w.t()).float()[:, None, :], labels[:, None]).sum(),
        ),
    ]
    skipped = {}
    try:
        if not cuda:
            raise ImportError("GPU only (Triton kernels compiled for CUDA)")
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        cands.append(timed("liger-kernel", lambda: liger(w, h, labels)))
    except ImportError as e:
        skipped["liger-kernel"] = str(e) or "not installed"
    try:
        if not cuda:
            raise ImportError("GPU only (Triton kernels compiled for CUDA)")
        from cut_cross_entropy import linear_cross_entropy

        cands.append(timed("cut-cross-entropy", lambda: linear_cross_entropy(h, w, labels, reduction="sum")))
        cands.append(
            timed(
                "cut-cross-entropy-exact",
                lambda: linear_cross_entropy(h, w, labels, reduction="sum", filter_eps=None),
            )
        )
    except ImportError as e:
        skipped["cut-cross-entropy"] = skipped["cut-cross-entropy-exact"] = str(e) or "not installed"
    times = {name: _timeit(fn, reps, cuda) for name, fn in cands}
    mean_nll = {name: float(loss) / tokens for name, loss in losses.items()}
    return times, {"inputs": inp["report"], "mean_nll": mean_nll, "skipped": skipped}


def bench_rmsnorm(hidden: int, rows: int, reps: int, dev: str, dtype) -> dict:
    """One norm over [rows, hidden], forward + backward (weight gradient reduced over the rows)."""
    import torch

    from megatron_soda.kernels.rmsnorm import rms_norm

    cuda = dev.startswith("cuda")
    x = torch.randn(rows, hidden, device=dev, dtype=dtype, requires_grad=True)
    w = torch.ones(hidden, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(rows, hidden, device=dev, dtype=dtype)
    ref = torch.nn.RMSNorm(hidden, eps=1e-5, device=dev, dtype=dtype)

    cands = [
        ("fused", lambda: rms_norm(x, w, 1e-5).backward(g)),
        ("torch", lambda: ref(x).backward(g)),
    ]
    if cuda:
        try:
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            liger = LigerRMSNorm(hidden, eps=1e-5).to(dev, dtype)
            cands.append(("liger-kernel", lambda: liger(x).backward(g)))
        except ImportError:
            pass
    return {name: _timeit(fn, reps, cuda) for name, fn in cands}


def bench_rope(seq: int, heads: int, head_dim: int, reps: int, dev: str, dtype) -> dict:
    """Rotary embedding of a query tensor [seq, 1, heads, head_dim], forward + backward."""
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_soda.kernels.rope import fused_apply_rotary_pos_emb

    cuda = dev.startswith("cuda")
    q = torch.randn(seq, 1, heads, head_dim, device=dev, dtype=dtype, requires_grad=True)
    half = torch.randn(seq, 1, 1, head_dim // 2, device=dev)
    freqs = torch.cat([half, half], dim=-1)
    g = torch.randn(q.shape, device=dev, dtype=dtype)
    cands = [
        ("fused", lambda: fused_apply_rotary_pos_emb(q, freqs).backward(g)),
        ("megatron-core", lambda: _apply_rotary_pos_emb_bshd(q, freqs).backward(g)),
    ]
    return {name: _timeit(fn, reps, cuda) for name, fn in cands}


def _print(title: str, rows: dict, cuda: bool) -> list[dict]:
    base_t, base_m = rows["fused"]
    print(title)
    out = []
    for name, (t, m) in rows.items():
        ratio = t / base_t
        mem = f"{m:10.1f} MiB  x{base_m / m:5.2f}" if cuda and m == m and m > 0 else "  peak memory n/a on CPU"
        print(f"  {name:<18} {t * 1e3:10.3f} ms  fused is {ratio:5.2f}x as fast  {mem}")
        out.append({"impl": name, "seconds": t, "peak_mib": m, "speedup_of_fused": ratio})
    return out


OPS = ("embedding", "ce", "race", "norm", "rope")


def _print_race(extra: dict) -> None:
    for name, r in extra["inputs"].items():
        print(
            f"    inputs {name:<10} {r['tokens']:>6} tokens  target {r['target']:.2f}  "
            f"entropy {r['entropy']:.2f}  NLL {r['nll']:.2f} nats"
        )
    print("    mean NLL per impl: " + ", ".join(f"{k} {v:.3f}" for k, v in extra["mean_nll"].items()))
    for name, why in extra["skipped"].items():
        print(f"    {name}: skipped: {why}")


def run(
    hiddens: list[int],
    tokens: list[int],
    tp: int,
    reps: int,
    vocab: int | None = None,
    norm_rope: bool = True,
    ops: list[str] | tuple[str, ...] = OPS,
) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    _megatron_session()
    v = (vocab or SODA_VOCAB) // tp
    ops = [o for o in ops if norm_rope or o not in ("norm", "rope")]
    print(
        f"kernels benchmark on {torch.cuda.get_device_name() if cuda else 'CPU (Triton interpreter)'}, "
        f"{dtype}, vocab {vocab or SODA_VOCAB} / TP {tp} = {v} rows per rank, fwd + bwd"
    )
    results = []
    for hd in hiddens:
        for n in tokens:
            shape = {"hidden": hd, "tokens": n, "vocab_rows": v}
            row = dict(shape)
            if "embedding" in ops:
                row["embedding"] = _print(
                    f"embedding  hidden {hd}, {n} tokens", bench_embedding(hd, n, v, reps, dev, dtype), cuda
                )
            if "ce" in ops:
                row["cross_entropy"] = _print(
                    f"output CE  hidden {hd}, {n} tokens", bench_ce(hd, n, v, reps, dev, dtype, min(n, 4096)), cuda
                )
            if len(row) > len(shape):
                results.append(row)
            if "race" in ops:
                if tp != 1 or v < RACE_MIN_VOCAB:
                    print(f"fair CE race  hidden {hd}, {n} tokens: skipped (needs TP 1 and vocab >= {RACE_MIN_VOCAB})")
                    continue
                times, extra = bench_ce_race(hd, n, v, reps, dev, dtype, min(n, 4096))
                race = _print(
                    f"fair CE race  hidden {hd}, {n} tokens (trained-model entropy per token type)", times, cuda
                )
                _print_race(extra)
                results.append({**shape, "ce_race": race, "race": extra})
    n = max(tokens)
    if "norm" in ops:
        for hd in hiddens:
            rows = _print(f"RMSNorm  hidden {hd}, {n} rows", bench_rmsnorm(hd, n, reps, dev, dtype), cuda)
            results.append({"hidden": hd, "tokens": n, "rmsnorm": rows})
    for head_dim, heads in ((64, 8), (128, 32)):  # 135M's and 4B's query shapes
        row = {"head_dim": head_dim, "heads": heads, "tokens": n}
        if "norm" in ops:
            row["qk_norm"] = _print(
                f"QK-norm  head_dim {head_dim}, {n * heads} rows",
                bench_rmsnorm(head_dim, n * heads, reps, dev, dtype),
                cuda,
            )
        if "rope" in ops:
            row["rope"] = _print(
                f"RoPE  {n} x {heads} heads x {head_dim}", bench_rope(n, heads, head_dim, reps, dev, dtype), cuda
            )
        if len(row) > 3:
            results.append(row)
    return results


@dataclass
class KernelBenchConfig:
    hidden: list[int] = field(
        default_factory=lambda: [576, 1024, 2048, 2560], metadata={"help": "comma list of hidden sizes"}
    )
    tokens: list[int] = field(
        default_factory=lambda: [8192, 32768], metadata={"help": "comma list of tokens per micro-batch"}
    )
    tp: int = field(default=1, metadata={"help": "vocab rows per rank = 144,644 / TP"})
    vocab: int | None = field(default=None, metadata={"help": "override the vocabulary (small shapes on CPU)"})
    reps: int = 5
    ops: list[str] = field(
        default_factory=lambda: list(OPS),
        metadata={
            "help": "comma list of embedding, ce (random inputs), race (the fair CE race: trained-model "
            "entropy), norm (RMSNorm, QK-norm), rope"
        },
    )
    json: str | None = field(default=None, metadata={"help": "also write the rows here"})


def bench_job(cfg: KernelBenchConfig) -> list[dict]:
    """`soda bench kernels`: fused embedding / linear+CE (random inputs and the fair race) / RMSNorm /
    RoPE vs megatron-core, torch and peers."""
    bad = [o for o in cfg.ops if o not in OPS]
    if bad:
        raise UserError(f"--ops: unknown {bad[0]!r} (ops: {', '.join(OPS)})")
    rows = run(cfg.hidden, cfg.tokens, cfg.tp, cfg.reps, cfg.vocab, ops=cfg.ops)
    write_json(rows, cfg.json)
    return rows
