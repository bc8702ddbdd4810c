"""Fused LayerNorm / RMSNorm: a Triton kernel (``gptpar.kernels.norm``) with the torch reference beside it.

``layer_norm(x, weight, bias, eps)`` and ``rms_norm(x, weight, eps)`` normalise the last dimension of
``x [..., N]``. Dispatch: Triton for CUDA tensors when Triton is importable, the reference otherwise;
``GPTPAR_TRITON=1`` forces Triton (on CPU that needs ``TRITON_INTERPRET=1``), ``GPTPAR_TRITON=0`` forces the
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptpar.ops.dispatch import use_triton


def reference_layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def reference_rms_norm(x, weight, eps: float = 1e-5):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _warps(block: int) -> int:
    """Warps per row program: one per 256 elements of the row block, 1 to 8 (as Triton's LayerNorm tutorial)."""
    return min(max(block // 256, 1), 8)


class _TritonNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms):
        import triton

        from gptpar.kernels.norm import norm_fwd_kernel

        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, n = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        norm_fwd_kernel[(m,)](
            x2,
            weight,
            bias if bias is not None else weight,
            y,
            mean,
            rstd,
            x2.stride(0),
            n,
            eps,
            RMS=rms,
            HAS_B=bias is not None,
            BLOCK=block,
            num_warps=_warps(block),
        )
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.shape, ctx.block = rms, bias is not None, shape, block
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        from gptpar.kernels.norm import norm_bwd_kernel

        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        rows = -(-m // 512)  # at most 512 programs, each summing its rows' dW/dB in registers
        groups = -(-m // rows)
        dw = torch.empty(groups, n, dtype=torch.float32, device=x2.device)
        db = torch.empty(groups, n, dtype=torch.float32, device=x2.device)
        norm_bwd_kernel[(groups,)](
            x2,
            weight,
            dy2,
            dx,
            mean,
            rstd,
            dw,
            db,
            x2.stride(0),
            m,
            n,
            ROWS=rows,
            RMS=ctx.rms,
            BLOCK=ctx.block,
            num_warps=_warps(ctx.block),
        )
        dbias = db.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), dbias, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    if use_triton(x):
        return _TritonNorm.apply(x, weight, bias, eps, False)
    return reference_layer_norm(x, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    if use_triton(x):
        return _TritonNorm.apply(x, weight, None, eps, True)
    return reference_rms_norm(x, weight, eps)
