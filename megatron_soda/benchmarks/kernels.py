"""`soda bench kernels`: fused kernels vs the reference paths, forward + backward, same run.

Embedding: fused lookup vs torch's F.embedding path and megatron-core's VocabParallelEmbedding.
Output layer: fused linear + cross-entropy vs torch linear + F.cross_entropy and megatron-core's
vocab_parallel_cross_entropy, and the well-kept peers when installed (Liger-Kernel's fused linear
cross-entropy, Apple's cut-cross-entropy). Time ratios everywhere; peak-memory ratios on GPU
(torch.cuda.max_memory_allocated). On CPU the kernels run in Triton's interpreter: the numbers then
only show that the benchmark works, not how fast anything is.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import megatron_soda  # noqa: F401  (Triton interpreter switch before Triton is imported)

SODA_VOCAB = 144_644


def _timeit(fn, reps: int, cuda: bool) -> tuple[float, float]:
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


def _megatron_session():
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        if not torch.cuda.is_available():
            from megatron_soda import cpu_backend

            cpu_backend.enable()
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
        ps.initialize_model_parallel(1, 1)


def bench_embedding(hidden: int, tokens: int, vocab: int, reps: int, dev: str, dtype) -> dict:
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from kernels.codec_embedding import fused_embedding

    cuda = dev.startswith("cuda")
    ids32 = torch.randint(0, vocab, (tokens,), device=dev, dtype=torch.int32)
    ids = ids32.long()
    w = torch.randn(vocab, hidden, device=dev, dtype=dtype, requires_grad=True)
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

    def fused():
        fused_embedding(ids32, w, 0, vocab).backward(g)

    def torch_ref():
        F.embedding(ids, w).backward(g)

    def megatron():
        mc(ids).backward(g)

    rows = {}
    for name, fn in (("fused", fused), ("torch", torch_ref), ("megatron-core", megatron)):
        rows[name] = _timeit(fn, reps, cuda)
    return rows


def bench_ce(hidden: int, tokens: int, vocab: int, reps: int, dev: str, dtype, chunk: int) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from kernels.fused_ce import fused_linear_cross_entropy

    cuda = dev.startswith("cuda")
    h = torch.randn(tokens, hidden, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev, dtype=dtype) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=dev)

    def fused():
        nll, _ = fused_linear_cross_entropy(h, w, labels, 0, vocab, chunk=chunk)
        nll.mean().backward()

    def torch_ref():
        F.cross_entropy((h @ w.t()).float(), labels).backward()

    def megatron():
        logits = (h @ w.t()).float()
        vocab_parallel_cross_entropy(logits[:, None, :], labels[:, None]).mean().backward()

    cands = [("fused", fused), ("torch", torch_ref), ("megatron-core", megatron)]
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        cands.append(("liger-kernel", lambda: liger(w, h, labels).backward()))
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        cands.append(("cut-cross-entropy", lambda: linear_cross_entropy(h, w, labels).backward()))
    except ImportError:
        pass
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


def run(hiddens: list[int], tokens: list[int], tp: int, reps: int, vocab: int | None = None) -> list[dict]:
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
    return results
