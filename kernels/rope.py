"""Rotary position embedding (RoPE), applied to the query and key heads of a fused q|k|v activation.

Shapes: ``X [T, H, D]`` contiguous (tokens ``T = s * B`` in ``[s, B]`` order, heads, head dim), tables
``Cos, Sin [s, D/2]`` fp32 at each token's true position. The first ``NROT`` heads (q and k) are rotated in
the rotate-half convention of Llama / Hugging Face: ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``;
the remaining heads (v) are copied. One read and one write of the activation. ``SIGN = -1`` rotates by
``-theta``: the backward pass. Computed in fp32, stored in the output's dtype.
"""

import triton
import triton.language as tl


@triton.jit
def rope_kernel(X, Out, Cos, Sin, H, NROT, B, SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    hmask = offs_h < H
    base = t * H * 2 * HALF + offs_h[:, None] * 2 * HALF + offs_d[None, :]
    x1 = tl.load(X + base, mask=hmask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF, mask=hmask[:, None], other=0.0).to(tl.float32)
    row = t // B
    c = tl.load(Cos + row * HALF + offs_d)[None, :]
    s = tl.load(Sin + row * HALF + offs_d)[None, :] * SIGN
    rot = (offs_h < NROT)[:, None]
    y1 = tl.where(rot, x1 * c - x2 * s, x1)
    y2 = tl.where(rot, x2 * c + x1 * s, x2)
    tl.store(Out + base, y1.to(Out.dtype.element_ty), mask=hmask[:, None])
    tl.store(Out + base + HALF, y2.to(Out.dtype.element_ty), mask=hmask[:, None])
