"""Linear layers whose weight gradient can be deferred: the split of backward into ``I`` (input
gradient, on the critical path between pipeline stages) and ``W`` (weight gradient, off it) that
zero-bubble schedules need.

A forward run inside :func:`deferrable_weight_grads` (the pipeline engine's, for schedules with ``I``
actions) records a linear whose backward can split; outside it, the plain torch op runs (native autograd,
no Python in backward), unless the fused Triton GEMM + activation needs this module's backward anyway.
Outside :func:`defer_weight_grads` the backward is an ordinary linear backward. Inside it, backward
computes only the input gradient and queues a closure that, when run (the schedule's ``W`` action),
computes the weight and bias gradients and accumulates them into ``.grad`` (applying the parameter's
``grad_reduce``, e.g. the sequence-parallel all-reduce, first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gptpar.ops.dispatch import use_triton
from gptpar.ops.mlp import act_backward, apply_activation, check_activation, linear_act_forward

_queue: list[Callable[[], None]] | None = None
_deferrable = 0  # > 0: forwards record linears whose weight gradient can be deferred


@contextlib.contextmanager
def deferrable_weight_grads():
    """Forwards run inside this block record linears whose backward :func:`defer_weight_grads` can split."""
    global _deferrable
    _deferrable += 1
    try:
        yield
    finally:
        _deferrable -= 1


@contextlib.contextmanager
def defer_weight_grads(queue: list[Callable[[], None]]):
    """Backward passes run inside this block queue their weight-gradient work in ``queue``."""
    global _queue
    outer, _queue = _queue, queue
    try:
        yield queue
    finally:
        _queue = outer


def deferred_queue() -> list[Callable[[], None]] | None:
    """The queue weight-gradient work goes to right now (None: compute it immediately)."""
    return _queue


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    reduce = getattr(param, "grad_reduce", None)
    if reduce is not None:
        grad = reduce(grad)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def linear_weight_grads(g: torch.Tensor, x: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias gradients of ``y = x W^T + b`` from the output gradient ``g``, computed in ``g``'s
    dtype (as autocast ran the forward) and returned in the parameters' dtypes."""
    weight, bias = params
    g2 = g.reshape(-1, g.shape[-1])
    gw = g2.t().matmul(x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)
    return gw, (g2.sum(0).to(bias.dtype) if bias is not None else None)


def weight_grads_now_or_later(params, compute: Callable[[], tuple]) -> tuple:
    """``compute() -> (gw, gb)`` now, returned to autograd; or, inside :func:`defer_weight_grads`, queued for
    the schedule's W action (which accumulates into ``.grad``), returning ``(None, None)``."""
    if _queue is None:
        return compute()

    @torch.no_grad()
    def run():
        gw, gb = compute()
        accumulate_grad(params[0], gw)
        if gb is not None:
            accumulate_grad(params[1], gb)

    _queue.append(run)
    return None, None


def forward_saving(ctx, saved_input, x, weight, bias, activation: str | None) -> torch.Tensor:
    """Forward of ``act(x W^T + b)`` for a linear autograd Function: saves ``(saved_input, weight)`` and, with
    an activation, the pre-activation, for :func:`saved_and_pre_activation_grad`. ``saved_input`` is what
    backward needs of ``x`` (``x`` itself, or the sequence shard it was gathered from)."""
    ctx.params = (weight, bias)  # the leaves themselves, for deferred accumulation
    ctx.activation = activation
    if activation is None:
        ctx.save_for_backward(saved_input, weight)
        return torch.nn.functional.linear(x, weight, bias)
    y, pre = linear_act_forward(x, weight, bias, activation)
    ctx.save_for_backward(saved_input, weight, pre)
    return y


def saved_and_pre_activation_grad(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(saved_input, weight, gradient w.r.t. x W^T + b)``: through the fused activation gradient if any."""
    saved = ctx.saved_tensors  # read once: activation checkpointing allows one unpack
    if ctx.activation is not None:
        g = act_backward(saved[2], g, ctx.activation)
    return saved[0], saved[1], g


class _Linear(torch.autograd.Function):
    """``act(x W^T + b)`` (``activation`` None: no activation). With an activation the forward is the fused
    GEMM + epilogue of :mod:`gptpar.ops.mlp` and the backward starts with its fused activation gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, activation):
        return forward_saving(ctx, x, x, weight, bias, activation)

    @staticmethod
    def backward(ctx, g):
        x, weight, g = saved_and_pre_activation_grad(ctx, g)
        # Under autocast the output (and so g) is low precision while x and W are stored as given:
        # compute in g's dtype, as autocast did forward, and return gradients in the inputs' dtypes.
        grad_x = g.matmul(weight.to(g.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        params = ctx.params
        gw, gb = weight_grads_now_or_later(params, lambda: linear_weight_grads(g, x, params))
        return grad_x, gw, gb, None


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``F.linear`` (then ``activation``, fused: see :mod:`gptpar.ops.mlp`) with a deferrable weight
    gradient (see module docstring)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        if activation is None:
            return torch.nn.functional.linear(x, weight, bias)
        return linear_act_forward(x, weight, bias, activation)[0]
    if not _deferrable and (activation is None or not use_triton(x)):  # plain torch ops, native autograd
        y = torch.nn.functional.linear(x, weight, bias)
        return y if activation is None else apply_activation(y, activation)
    return _Linear.apply(x, weight, bias, activation)


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu"):
    """``act(x @ W^T + b)``, differentiable; see module docstring."""
    check_activation(activation)
    return linear(x, weight, bias, activation)
