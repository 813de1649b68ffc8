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

from megatron_soda.kernels import codec_embedding, fused_ce, rmsnorm, rope

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
CASES = [
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


def main() -> int:
    failed = 0
    for fn, sig, consts in CASES:
        names = fn.arg_names
        signature = {n: "constexpr" if n in consts else sig[n] for n in names}
        src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32))
            print(f"ok {fn.__name__} {consts}")
        except Exception as e:  # noqa: BLE001 (any compiler error is the finding)
            failed += 1
            print(f"FAILED {fn.__name__} {consts}: {str(e).splitlines()[-1][:500]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
