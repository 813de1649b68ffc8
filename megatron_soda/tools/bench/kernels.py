"""`soda bench kernels`: fused kernels vs the reference paths, forward + backward, same run.

Every candidate is timed as the training step uses it, weight gradient included: the weights carry
megatron's fp32 `main_grad`, our kernels add into it directly (gradient-accumulation fusion) and the
others produce a bf16 gradient that is then added to it, as megatron's DDP hook does.
Embedding: fused lookup vs torch's F.embedding path and megatron-core's VocabParallelEmbedding.
Output layer: our fused linear + cross-entropy (the training path: gradients computed in the
forward) vs torch linear + F.cross_entropy and megatron-core's vocab_parallel_cross_entropy, and
the well-kept peers when installed (Liger-Kernel's fused linear cross-entropy, Apple's
cut-cross-entropy). RMSNorm (hidden states and QK-norm shapes): ours vs torch (and Liger's). RoPE:
ours vs megatron-core's unfused path. Time ratios everywhere; peak-memory ratios on GPU
(torch.cuda.max_memory_allocated). On CPU the kernels run in Triton's interpreter: the numbers then
only show that the benchmark works, not how fast anything is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import megatron_soda  # noqa: F401  (Triton interpreter switch before Triton is imported)
from megatron_soda.tools.bench import write_json

if TYPE_CHECKING:
    import torch

SODA_VOCAB = 144_644


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

    def torch_ref():
        F.cross_entropy((h @ w.t()).float(), labels, reduction="sum").backward()
        _ddp_hook(w)

    def megatron():
        logits = (h @ w.t()).float()
        vocab_parallel_cross_entropy(logits[:, None, :], labels[:, None]).sum().backward()
        _ddp_hook(w)

    cands = [("fused", fused), ("torch", torch_ref), ("megatron-core", megatron)]
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


def run(
    hiddens: list[int], tokens: list[int], tp: int, reps: int, vocab: int | None = None, norm_rope: bool = True
) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    _megatron_session()
    v = (vocab or SODA_VOCAB) // tp
    print(
        f"kernels benchmark on {torch.cuda.get_device_name() if cuda else 'CPU (Triton interpreter)'}, "
        f"{dtype}, vocab {vocab or SODA_VOCAB} / TP {tp} = {v} rows per rank, fwd + bwd"
    )
    results = []
    for hd in hiddens:
        for n in tokens:
            shape = {"hidden": hd, "tokens": n, "vocab_rows": v}
            emb = _print(f"embedding  hidden {hd}, {n} tokens", bench_embedding(hd, n, v, reps, dev, dtype), cuda)
            ce = _print(f"output CE  hidden {hd}, {n} tokens", bench_ce(hd, n, v, reps, dev, dtype, min(n, 4096)), cuda)
            results.append({**shape, "embedding": emb, "cross_entropy": ce})
    if norm_rope:
        n = max(tokens)
        for hd in hiddens:
            rows = _print(f"RMSNorm  hidden {hd}, {n} rows", bench_rmsnorm(hd, n, reps, dev, dtype), cuda)
            results.append({"hidden": hd, "tokens": n, "rmsnorm": rows})
        for head_dim, heads in ((64, 8), (128, 32)):  # 135M's and 4B's query shapes
            qk = _print(
                f"QK-norm  head_dim {head_dim}, {n * heads} rows",
                bench_rmsnorm(head_dim, n * heads, reps, dev, dtype),
                cuda,
            )
            rope = _print(
                f"RoPE  {n} x {heads} heads x {head_dim}", bench_rope(n, heads, head_dim, reps, dev, dtype), cuda
            )
            results.append({"head_dim": head_dim, "heads": heads, "tokens": n, "qk_norm": qk, "rope": rope})
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
    json: str | None = field(default=None, metadata={"help": "also write the rows here"})


def bench_job(cfg: KernelBenchConfig) -> list[dict]:
    """`soda bench kernels`: fused embedding / linear+CE / RMSNorm / RoPE vs megatron-core, torch and peers."""
    rows = run(cfg.hidden, cfg.tokens, cfg.tp, cfg.reps, cfg.vocab)
    write_json(rows, cfg.json)
    return rows
