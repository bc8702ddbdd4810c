"""The column-parallel half of the MLP in one kernel: ``act(x @ W^T + b)`` with the bias and GeLU (tanh)
or SwiGLU in the GEMM's epilogue; and the activation's backward as one elementwise kernel.

SwiGLU: ``W`` holds the gate and up blocks (``[2f, h]``, gate first); the output is ``silu(gate) * up``.
"""

import triton
import triton.language as tl


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))


@triton.jit
def _matmul_tile(X, W, offs_m, offs_n, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)  # fmt: skip
        w = tl.load(W + offs_n[:, None] * K + offs_k[None, :], mask=(offs_n[:, None] < N) & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)  # fmt: skip
        acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def mlp_fwd_kernel(X, W, B, Pre, Y, M, F, K, HAS_B: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Y [M, F] = act(X [M, K] @ W^T + B); Pre (the pre-activation, [M, F] or [M, 2F]) is kept for backward."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < F)
    a = _matmul_tile(X, W, offs_m, offs_n, M, F, K, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_B:
        a += tl.load(B + offs_n, mask=offs_n < F, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        u = _matmul_tile(X, W + F * K, offs_m, offs_n, M, F, K, BLOCK_M, BLOCK_N, BLOCK_K)
        if HAS_B:
            u += tl.load(B + F + offs_n, mask=offs_n < F, other=0.0).to(tl.float32)[None, :]
        tl.store(Pre + offs_m[:, None] * (2 * F) + offs_n[None, :], a, mask=mask)
        tl.store(Pre + offs_m[:, None] * (2 * F) + F + offs_n[None, :], u, mask=mask)
        y = a / (1.0 + tl.exp(-a)) * u
    else:
        tl.store(Pre + offs_m[:, None] * F + offs_n[None, :], a, mask=mask)
        y = _gelu_tanh(a)
    tl.store(Y + offs_m[:, None] * F + offs_n[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def mlp_act_bwd_kernel(Pre, DY, DPre, M, F, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    """DPre = dY * act'(Pre), elementwise over [M, F] outputs (SwiGLU: both the gate and up halves)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * F
    row, col = offs // F, offs % F
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU:
        g = tl.load(Pre + row * 2 * F + col, mask=mask, other=0.0)
        u = tl.load(Pre + row * 2 * F + F + col, mask=mask, other=0.0)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(DPre + row * 2 * F + col, dy * u * sig * (1.0 + g * (1.0 - sig)), mask=mask)
        tl.store(DPre + row * 2 * F + F + col, dy * g * sig, mask=mask)
    else:
        x = tl.load(Pre + offs, mask=mask, other=0.0)
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
        tl.store(DPre + offs, dy * grad, mask=mask)
