"""Fused column-parallel MLP half: ``act(x @ W^T + b)`` (GeLU-tanh, or SwiGLU over gate|up blocks).

Triton (``gptpar.kernels.mlp``) for CUDA tensors or ``GPTPAR_TRITON=1``: the bias and activation run in the
GEMM's epilogue, and backward fuses the activation gradient into one elementwise kernel before the two
weight/input GEMMs. The reference is plain torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_linear_act(x, weight, bias, activation: str = "gelu"):
    h = F.linear(x, weight, bias)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


class _TritonLinearAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, swiglu):
        import triton

        from gptpar.kernels.mlp import mlp_fwd_kernel

        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, k = x2.shape
        f = weight.shape[0] // (2 if swiglu else 1)
        pre = torch.empty(m, weight.shape[0], dtype=torch.float32, device=x.device)
        y = torch.empty(m, f, dtype=x.dtype, device=x.device)
        bm, bn, bk = 32, 32, 32
        mlp_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(f, bn))](
            x2, weight.contiguous(), bias if bias is not None else weight, pre, y, m, f, k, HAS_B=bias is not None,
            SWIGLU=swiglu, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
        ctx.save_for_backward(x2, weight, pre)
        ctx.swiglu, ctx.has_bias, ctx.shape, ctx.f = swiglu, bias is not None, shape, f
        return y.view(*shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        import triton

        from gptpar.kernels.mlp import mlp_act_bwd_kernel

        x2, weight, pre = ctx.saved_tensors
        m, f = x2.shape[0], ctx.f
        dy2 = dy.reshape(m, f).contiguous()
        dpre = torch.empty_like(pre)
        block = 1024
        mlp_act_bwd_kernel[(triton.cdiv(m * f, block),)](pre, dy2, dpre, m, f, SWIGLU=ctx.swiglu, BLOCK=block)
        dx = (dpre @ weight.float()).to(x2.dtype).view(*ctx.shape)
        dw = (dpre.t() @ x2.float()).to(weight.dtype)
        db = dpre.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx, dw, db, None


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu"):
    """``act(x @ W^T + b)``; see module docstring."""
    from gptpar.ops.dispatch import use_triton

    if use_triton(x):
        return _TritonLinearAct.apply(x, weight, bias, activation == "swiglu")
    return reference_linear_act(x, weight, bias, activation)
