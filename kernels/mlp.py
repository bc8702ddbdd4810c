"""The column-parallel half of the MLP in one kernel: ``act(x @ W^T + b)`` with the bias and GeLU (tanh)
or SwiGLU in the GEMM's epilogue; and the activation's backward as one elementwise kernel.

SwiGLU: ``W`` holds the gate and up blocks (``[2f, h]``, gate first); one K loop feeds both accumulators
from the same ``x`` tile and the output is ``silu(gate) * up``. The pre-activation (``[M, F]`` or
``[M, 2F]``) is written beside the output for backward, as eager keeps it. Tiles are visited in groups of
``GROUP_M`` row blocks so neighbouring programs share ``W`` tiles in L2. Matmuls run in the inputs' dtype
with fp32 accumulation; ``UPCAST`` loads fp32 instead (the Triton interpreter mis-computes bf16); ``PREC``
is ``tl.dot``'s ``input_precision`` for fp32 operands (``"ieee"`` unless torch allows TF32).
"""

import triton
import triton.language as tl


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))


@triton.jit
def mlp_fwd_kernel(
    X,
    W,
    B,
    Pre,
    Y,
    M,
    F,
    K,
    HAS_B: tl.constexpr,
    SWIGLU: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y [M, F] = act(X [M, K] @ W^T + B); Pre keeps the pre-activation."""
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BLOCK_M), tl.cdiv(F, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k0 = tl.arange(0, BLOCK_K)
    mmask, nmask = offs_m < M, offs_n < F
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        kmask = offs_k < K
        x = tl.load(X + offs_m[:, None] * K + offs_k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + offs_n[:, None] * K + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PREC)
        if SWIGLU:
            u = tl.load(
                W + (offs_n[:, None] + F) * K + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0
            )
            if UPCAST:
                u = u.to(tl.float32)
            acc_u += tl.dot(x, tl.trans(u), input_precision=PREC)
    if HAS_B:
        acc += tl.load(B + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    mask = mmask[:, None] & nmask[None, :]
    if SWIGLU:
        if HAS_B:
            acc_u += tl.load(B + F + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Pre + offs_m[:, None] * (2 * F) + offs_n[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
        tl.store(Pre + offs_m[:, None] * (2 * F) + F + offs_n[None, :], acc_u.to(Pre.dtype.element_ty), mask=mask)
        y = acc / (1.0 + tl.exp(-acc)) * acc_u
    else:
        tl.store(Pre + offs_m[:, None] * F + offs_n[None, :], acc.to(Pre.dtype.element_ty), mask=mask)
        y = _gelu_tanh(acc)
    tl.store(Y + offs_m[:, None] * F + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def mlp_act_bwd_kernel(Pre, DY, DPre, M, F, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    """DPre = dY * act'(Pre), elementwise over [M, F] outputs (SwiGLU: both the gate and up halves); fp32 math."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * F
    row, col = offs // F, offs % F
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        g = tl.load(Pre + row * 2 * F + col, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(Pre + row * 2 * F + F + col, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(
            DPre + row * 2 * F + col, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DPre.dtype.element_ty), mask=mask
        )
        tl.store(DPre + row * 2 * F + F + col, (dy * g * sig).to(DPre.dtype.element_ty), mask=mask)
    else:
        x = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
        tl.store(DPre + offs, (dy * grad).to(DPre.dtype.element_ty), mask=mask)


# On GPUs the tile shape is autotuned per (M, F, K); the interpreter calls the plain kernel with 32^3 tiles.
mlp_fwd = triton.autotune(
    [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in (
            (128, 128, 64, 8, 3),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
        )
    ],
    key=["M", "F", "K", "SWIGLU"],
)(mlp_fwd_kernel)
