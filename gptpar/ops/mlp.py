"""Fused column-parallel MLP half: ``act(x @ W^T + b)`` (GeLU-tanh, or SwiGLU over gate|up blocks).

Two halves, each with a Triton kernel (``gptpar.kernels.mlp``, for CUDA tensors or ``GPTPAR_TRITON=1``)
and a torch reference:

* :func:`linear_act_forward` — the GEMM with bias and activation in its epilogue; returns the output and
  the pre-activation (kept for backward, as eager keeps it).
* :func:`act_backward` — the activation's gradient in one elementwise kernel (fp32 math), which the
  linear's backward then feeds to its input- and weight-gradient GEMMs.

:func:`linear_act` is the differentiable op; it is the deferrable-weight-gradient linear of
:mod:`gptpar.ops.wgrad` with an activation, so zero-bubble pipelines split its backward too.
Under autocast the Triton path runs in the autocast dtype, as ``F.linear`` would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptpar.errors import GptparConfigError
from gptpar.ops.dispatch import dot_precision, interpreting, upcast_loads, use_triton

ACTIVATIONS = ("gelu", "swiglu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise GptparConfigError(f"activation={activation!r} is unknown; expected one of {ACTIVATIONS}")


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation alone (reference): GeLU-tanh, or ``silu(gate) * up`` over ``h = gate|up``."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh")


def reference_linear_act(x, weight, bias, activation: str = "gelu"):
    return apply_activation(F.linear(x, weight, bias), activation)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def linear_act_forward(x, weight, bias, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(act(x W^T + b), x W^T + b)`` without autograd; Triton or reference by :func:`use_triton`."""
    if not use_triton(x):
        pre = F.linear(x, weight, bias)
        return apply_activation(pre, activation), pre
    import triton

    from gptpar.kernels import mlp as kern

    dt = _compute_dtype(x)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dt).contiguous()
    w = weight.to(dt).contiguous()
    m, k = x2.shape
    swiglu = activation == "swiglu"
    f = w.shape[0] // 2 if swiglu else w.shape[0]
    pre = torch.empty(m, w.shape[0], dtype=dt, device=x.device)
    y = torch.empty(m, f, dtype=dt, device=x.device)
    args = (x2, w, bias if bias is not None else w, pre, y, m, f, k)
    consts = {
        "HAS_B": bias is not None,
        "SWIGLU": swiglu,
        "UPCAST": upcast_loads(dt),
        "PREC": dot_precision(dt),
    }
    if interpreting():
        blocks = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
        kern.mlp_fwd_kernel[(triton.cdiv(m, 32) * triton.cdiv(f, 32),)](*args, **consts, **blocks)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(f, meta["BLOCK_N"]),)  # noqa: E731
        kern.mlp_fwd[grid](*args, **consts)
    return y.view(*shape[:-1], f), pre.view(*shape[:-1], w.shape[0])


def reference_act_backward(pre: torch.Tensor, dy: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation's gradient by ATen's own fused elementwise kernels (``gelu_backward``,
    ``silu_backward``: one pass each, as eager autograd runs them), computed in fp32 or wider."""
    acc = torch.promote_types(pre.dtype, torch.float32)
    p, g = pre.to(acc), dy.to(acc)
    if activation == "swiglu":
        gate, up = p.chunk(2, dim=-1)
        return torch.cat([torch.ops.aten.silu_backward(g * up, gate), g * F.silu(gate)], dim=-1).to(pre.dtype)
    return torch.ops.aten.gelu_backward(g, p, approximate="tanh").to(pre.dtype)


def act_backward(pre: torch.Tensor, dy: torch.Tensor, activation: str) -> torch.Tensor:
    """Gradient w.r.t. the pre-activation ``pre`` (``[..., F]``, or ``[..., 2F]`` for SwiGLU) from ``dy``
    (``[..., F]``), in ``pre``'s dtype, computed in fp32."""
    if not use_triton(pre):
        return reference_act_backward(pre, dy, activation)
    import triton

    from gptpar.kernels.mlp import mlp_act_bwd_kernel

    f = dy.shape[-1]
    m = dy.numel() // f
    pre_c, dy_c = pre.contiguous(), dy.contiguous()
    dpre = torch.empty_like(pre_c)
    block = 1024
    mlp_act_bwd_kernel[(triton.cdiv(m * f, block),)](
        pre_c, dy_c, dpre, m, f, SWIGLU=activation == "swiglu", BLOCK=block
    )
    return dpre
