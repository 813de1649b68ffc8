"""Compile every Triton kernel of kernels/ for an H100 (sm_90) on a machine without a GPU.

Triton's interpreter (what the CPU tests run) accepts code the compiler refuses, e.g. a Python global
inside a kernel; compiling ahead for the GPU target catches that without a GPU. Run with
TRITON_INTERPRET=0 (tests/test_kernels.py does); prints one line per kernel variant, exits 1 on a failure.
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_soda.kernels import blockwise_ce, codec_embedding, fused_ce, rmsnorm, rope

RMS_BWD_ARGS = dict(  # the one-pass RMSNorm backward's signature (bf16 tensors, fp32 partials)
    x_ptr="*bf16", w_ptr="*bf16", dy_ptr="*bf16", rstd_ptr="*fp32", dx_ptr="*bf16", dw_part_ptr="*fp32", n_rows="i32"
)

CE = dict(
    logits_ptr="*bf16",
    labels_ptr="*i64",
    max_ptr="*fp32",
    sum_ptr="*fp32",
    tgt_ptr="*fp32",
    lse_ptr="*fp32",
    nll_ptr="*fp32",
    g_nll_ptr="*fp32",
    g_lse_ptr="*fp32",
    n_rows="i32",
    V="i32",
    n_real="i32",
    start="i32",
    z_loss="fp32",
)
EMB = dict(ids_ptr="*i64", n_tokens="i32", start="i32", end="i32")
BW = dict(h_ptr="*bf16", w_ptr="*bf16", labels_ptr="*i64", n_rows="i32", V="i32", n_real="i32", H="i32", start="i32")
BW_TILES = dict(BLOCK_T=blockwise_ce.BLOCK_T, BLOCK_V=blockwise_ce.BLOCK_V, BLOCK_K=blockwise_ce.BLOCK_K, IEEE=False)
CASES = [
    (
        blockwise_ce._lse_fwd,
        dict(BW, max_ptr="*fp32", sum_ptr="*fp32", tgt_ptr="*fp32", v_per_split="i32"),
        BW_TILES,
    ),
    (  # fp32 operands (the fp32 selfcheck on a GPU): IEEE products
        blockwise_ce._lse_fwd,
        dict(BW, h_ptr="*fp32", w_ptr="*fp32", max_ptr="*fp32", sum_ptr="*fp32", tgt_ptr="*fp32", v_per_split="i32"),
        dict(BW_TILES, IEEE=True),
    ),
    *[  # exact and filtered; d(weight) or d(hidden) only (a frozen input); fp32 operands (IEEE products)
        (
            blockwise_ce._grad_tiles,
            dict(
                BW,
                lse_ptr="*fp32",
                g_nll_ptr="*fp32",
                g_lse_ptr="*fp32",
                dh_ptr="*fp32",
                dw_ptr="*fp32",
                filter_eps="fp32",
                **(dict(h_ptr="*fp32", w_ptr="*fp32") if ieee else {}),
            ),
            dict(BW_TILES, GROUP_T=blockwise_ce.GROUP_T, FILTER=f, COMPUTE_DH=dh, COMPUTE_DW=dw, IEEE=ieee),
        )
        for f, dh, dw, ieee in (
            (False, True, True, False),
            (True, True, True, False),
            (False, False, True, False),
            (False, True, False, False),
            (False, True, True, True),
        )
    ],
    *[(fused_ce._ce_rows, CE, dict(MODE=m, BLOCK_T=fused_ce.BLOCK_T, BLOCK_V=fused_ce.BLOCK_V)) for m in (0, 1, 2, 3)],
    (
        rmsnorm._rms_fwd,
        dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", rstd_ptr="*fp32", n_rows="i32", eps="fp32"),
        dict(N=2560, BLOCK_M=1, BLOCK_N=4096),
    ),
    (
        rmsnorm._rms_bwd,
        RMS_BWD_ARGS,
        dict(N=128, BLOCK_M=32, BLOCK_N=128),
    ),
    *[  # the one-pass backward at the hidden sizes of the presets' norms and the 64-dim QK-norm
        (
            rmsnorm._rms_bwd,
            RMS_BWD_ARGS,
            dict(N=n, BLOCK_M=max(1, rmsnorm.MAX_BLOCK_ELEMENTS // b), BLOCK_N=b),
        )
        for n, b in ((64, 64), (512, 512), (2560, 4096))
    ],
    (
        rmsnorm._dw_sum,
        dict(part_ptr="*fp32", dw_ptr="*bf16", n_part="i32"),
        dict(N=2560, BLOCK_P=rmsnorm.DW_BLOCK_P, BLOCK_N=rmsnorm.DW_BLOCK_N),
    ),
    *[
        (
            rope._rope,
            dict(
                x_ptr="*bf16",
                f_ptr="*fp32",
                y_ptr="*bf16",
                n_rows="i32",
                B="i32",
                H="i32",
                sx_s="i32",
                sx_b="i32",
                sx_h="i32",
                sf_s="i32",
            ),
            dict(HALF=64, BLOCK_R=rope.BLOCK_R, BLOCK_D=64, BACKWARD=bw),
        )
        for bw in (False, True)
    ],
    (codec_embedding._embed_fwd, dict(EMB, w_ptr="*bf16", out_ptr="*bf16"), dict(H=2560, BLOCK_T=64, BLOCK_H=256)),
    (codec_embedding._embed_bwd, dict(EMB, g_ptr="*bf16", gw_ptr="*fp32"), dict(H=2560, BLOCK_T=64, BLOCK_H=256)),
]


# the launch options of the kernels that set their own (the compiler's shared-memory plan follows them)
OPTIONS = {
    blockwise_ce._lse_fwd: lambda consts: blockwise_ce.gpu_options(consts["IEEE"]),
    blockwise_ce._grad_tiles: lambda consts: blockwise_ce.gpu_options(consts["IEEE"]),
}
H100_SHARED_BYTES = 232_448  # the most shared memory one block may use on sm_90 (227 KiB): more fails at launch
# integer arguments that are multiples of 16 at every real launch (padded vocabulary, hidden sizes, slice
# starts): Triton specialises a launch on that, and the specialisation decides the shared-memory plan
DIVISIBLE_INTS = {
    blockwise_ce._lse_fwd: {"V", "H", "start", "v_per_split"},
    blockwise_ce._grad_tiles: {"V", "H", "start"},
}


def _attrs(fn, signature: dict) -> dict:
    """The divisibility a real launch tells the compiler: pointers from torch allocations are aligned,
    and DIVISIBLE_INTS are multiples of 16."""
    div = DIVISIBLE_INTS.get(fn, set())
    names = fn.arg_names
    hinted = [n for n, t in signature.items() if t.startswith("*") or n in div]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def main() -> int:
    failed = 0
    for fn, sig, consts in CASES:
        names = fn.arg_names
        signature = {n: "constexpr" if n in consts else sig[n] for n in names}
        src = ASTSource(
            fn=fn,
            signature=signature,
            constexprs={(names.index(k),): v for k, v in consts.items()},
            attrs=_attrs(fn, signature),
        )
        try:
            kernel = triton.compile(
                src, target=GPUTarget("cuda", 90, 32), options=OPTIONS[fn](consts) if fn in OPTIONS else {}
            )
            shared = kernel.metadata.shared
            if shared > H100_SHARED_BYTES:
                raise RuntimeError(f"needs {shared} bytes of shared memory, sm_90 has {H100_SHARED_BYTES}")
            print(f"ok {fn.__name__} {consts} shared {shared}")
        except Exception as e:  # noqa: BLE001 (any compiler error is the finding)
            failed += 1
            print(f"FAILED {fn.__name__} {consts}: {str(e).splitlines()[-1][:500]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
