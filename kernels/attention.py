"""Flash attention (forward and backward) that returns the log-sum-exp and masks by global positions.

Shapes: q ``[BH, Sq, D]``, k/v ``[BH, Sk, D]`` (batch and heads flattened, contiguous), positions
``qpos [Sq]``, ``kpos [Sk]`` (int64; a key is visible iff ``qpos >= kpos`` when causal). Online softmax in
fp32; a row that sees no key gets ``out = 0``, ``lse = -inf`` (so ring attention can merge it away).
Backward recomputes the probabilities from the LSE (FlashAttention-2): one kernel for dK/dV per key block,
one for dQ per query block, no atomics. Loads are upcast to fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(q, k_ptrs, kpos_ptrs, offs_n, qpos, Sk, scale, CAUSAL: tl.constexpr):
    kmask = offs_n < Sk
    k = tl.load(k_ptrs, mask=kmask[:, None], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k)) * scale
    visible = kmask[None, :]
    if CAUSAL:
        kpos = tl.load(kpos_ptrs, mask=kmask, other=0)
        visible = visible & (qpos[:, None] >= kpos[None, :])
    return tl.where(visible, s, -float("inf")), kmask


@triton.jit
def attn_fwd_kernel(Q, K, V, Out, LSE, QPos, KPos, Sq, Sk, scale, CAUSAL: tl.constexpr, D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    qmask = offs_m < Sq
    q = tl.load(Q + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
    qpos = tl.load(QPos + offs_m, mask=qmask, other=0)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, Sk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s, kmask = _scores(q, K + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], KPos + offs_n, offs_n, qpos, Sk,
                           scale, CAUSAL)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0).to(
            tl.float32
        )
        acc = acc * alpha[:, None] + tl.dot(p, v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse = tl.where(l_i == 0.0, -float("inf"), m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i)))
    tl.store(
        Out + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=qmask[:, None]
    )
    tl.store(LSE + bh * Sq + offs_m, lse, mask=qmask)


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, QPos, KPos, Sq, Sk, scale, CAUSAL: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kmask = offs_n < Sk
    k = tl.load(K + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0).to(tl.float32)
    v = tl.load(V + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0).to(tl.float32)
    kpos = tl.load(KPos + offs_n, mask=kmask, other=0)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    for start in range(0, Sq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        qmask = offs_m < Sq
        q = tl.load(Q + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], mask=qmask[:, None], other=0.0).to(
            tl.float32
        )
        do = tl.load(DO + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], mask=qmask[:, None], other=0.0).to(
            tl.float32
        )
        lse = tl.load(LSE + bh * Sq + offs_m, mask=qmask, other=float("inf"))
        delta = tl.load(Delta + bh * Sq + offs_m, mask=qmask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        visible = qmask[:, None] & kmask[None, :]
        if CAUSAL:
            qpos = tl.load(QPos + offs_m, mask=qmask, other=0)
            visible = visible & (qpos[:, None] >= kpos[None, :])
        lse_safe = tl.where(lse == -float("inf"), float("inf"), lse)  # empty rows: p = 0
        p = tl.where(visible, tl.exp(s - lse_safe[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q) * scale
    tl.store(DK + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask[:, None])
    tl.store(DV + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, QPos, KPos, Sq, Sk, scale, CAUSAL: tl.constexpr,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    qmask = offs_m < Sq
    q = tl.load(Q + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], mask=qmask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], mask=qmask[:, None], other=0.0).to(
        tl.float32
    )
    lse = tl.load(LSE + bh * Sq + offs_m, mask=qmask, other=float("inf"))
    lse_safe = tl.where(lse == -float("inf"), float("inf"), lse)
    delta = tl.load(Delta + bh * Sq + offs_m, mask=qmask, other=0.0)
    qpos = tl.load(QPos + offs_m, mask=qmask, other=0)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, Sk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s, kmask = _scores(q, K + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], KPos + offs_n, offs_n, qpos, Sk,
                           scale, CAUSAL)  # fmt: skip
        p = tl.where(qmask[:, None], tl.exp(s - lse_safe[:, None]), 0.0)
        v = tl.load(V + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0).to(
            tl.float32
        )
        k = tl.load(K + bh * Sk * D + offs_n[:, None] * D + offs_d[None, :], mask=kmask[:, None], other=0.0).to(
            tl.float32
        )
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds, k) * scale
    tl.store(DQ + bh * Sq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask[:, None])
