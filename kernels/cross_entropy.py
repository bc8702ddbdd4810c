"""Cross-entropy statistics over one rank's vocabulary shard, without materialising the softmax.

Forward: per row, the local maximum, the sum of ``exp(x - max)`` over the shard (online, in vocabulary
blocks) and the target's logit if this shard owns it. The vocab-parallel loss combines these across tp.
Backward: ``(softmax - onehot) * dloss`` from the global max and sum, written over the logits' buffer.
"""

import triton
import triton.language as tl


@triton.jit
def ce_stats_kernel(X, T, Max, Sum, Tgt, stride, V, start, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    target = tl.load(T + row)
    m = -float("inf")
    s = 0.0
    tval = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(X + row * stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(x - m_new), 0.0), axis=0)
        m = m_new
        tval += tl.sum(tl.where((cols == target - start) & mask, x, 0.0), axis=0)
    tl.store(Max + row, m)
    tl.store(Sum + row, s)
    tl.store(Tgt + row, tval)


@triton.jit
def ce_grad_kernel(X, T, Max, Sum, DLoss, stride, V, start, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    target = tl.load(T + row)
    m = tl.load(Max + row)
    s = tl.load(Sum + row)
    d = tl.load(DLoss + row)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - m) / s - tl.where((cols == target - start) & mask, 1.0, 0.0)
        tl.store(X + row * stride + cols, (g * d).to(X.dtype.element_ty), mask=mask)
