"""The memory-bound steps around a gradient all-reduce and an optimizer step.

Each op has a pure-torch ``reference_*`` (several passes over memory; the ground truth) and a fused
one-pass version in the native extension (C++/OpenMP on CPU, CUDA when built). The plain-named entry
dispatches: native when built, the tensors are supported and ``GPTPAR_DISABLE_NATIVE`` is not ``1``.
The native CPU ops do the reference's arithmetic operation for operation, so they are bitwise equal.

Shapes: ``tensors`` is any list of contiguous tensors; ``flat`` buffers hold them back to back
(``sum(t.numel())`` elements) in list order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptpar._native import native

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def _native_ok(ext, tensors: Sequence[torch.Tensor]) -> bool:
    if ext is None:
        return False
    for t in tensors:
        if not t.is_contiguous() or t.dtype not in LOW_PRECISION:
            return False
        if t.is_cuda and not ext.with_cuda:
            return False
        if not (t.is_cuda or t.is_cpu):
            return False
    return True


# ---------------------------------------------------------------------------------------------- pack_cast
def reference_pack_cast(
    tensors: Sequence[torch.Tensor], scale: float, out: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor:
    value = (
        torch.cat([t.reshape(-1) for t in tensors]).float() * scale
        if tensors
        else out.new_zeros(0, dtype=torch.float32)
    )
    if residual is not None:
        value = value + residual
    out.copy_(value.to(out.dtype))
    if residual is not None:
        residual.copy_(value - out.float())
    return out


def pack_cast(
    tensors: Sequence[torch.Tensor],
    scale: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack ``tensors`` into one flat ``dtype`` buffer: ``cast(t * scale (+ residual))``, round-to-nearest-even.

    ``residual`` (flat fp32, optional) is error feedback: added before the cast and overwritten with the
    cast's error (``value - float(cast(value))``) for the next step. Returns ``out`` (allocated if None).
    """
    total = sum(t.numel() for t in tensors)
    device = tensors[0].device if tensors else (out.device if out is not None else torch.device("cpu"))
    if out is None:
        out = torch.empty(total, dtype=dtype, device=device)
    ext = native()
    same_dtype = len({t.dtype for t in tensors}) <= 1
    if same_dtype and _native_ok(ext, [*tensors, out] + ([residual] if residual is not None else [])):
        ext.pack_cast(list(tensors), out, float(scale), residual, _stream(out))
        return out
    return reference_pack_cast(tensors, scale, out, residual)


# ---------------------------------------------------------------------------------------------- unpack
def reference_unpack_accumulate(flat: torch.Tensor, dests: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    offset = 0
    for d in dests:
        n = d.numel()
        d.add_(flat[offset : offset + n].view_as(d).float() * scale)
        offset += n


def unpack_accumulate(flat: torch.Tensor, dests: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """``dests[i] += float(flat[slice i]) * scale`` for fp32 ``dests`` (e.g. master gradients), one pass."""
    if flat.numel() != sum(d.numel() for d in dests):
        raise ValueError(
            f"unpack_accumulate: flat has {flat.numel()} elements, destinations {sum(d.numel() for d in dests)}"
        )
    ext = native()
    if all(d.dtype == torch.float32 for d in dests) and _native_ok(ext, [flat, *dests]):
        ext.unpack_accumulate(flat, list(dests), float(scale), _stream(flat))
        return
    reference_unpack_accumulate(flat, dests, scale)


# ---------------------------------------------------------------------------------------------- unscale
def reference_unscale_check_(grads: Sequence[torch.Tensor], inv_scale: float, found_inf: torch.Tensor) -> torch.Tensor:
    for g in grads:
        g.mul_(inv_scale)
        if not bool(torch.isfinite(g).all()):
            found_inf.fill_(1.0)
    return found_inf


def unscale_check_(
    grads: torch.Tensor | Sequence[torch.Tensor], inv_scale: float, found_inf: torch.Tensor | None = None
) -> torch.Tensor:
    """``g *= inv_scale`` in place for fp32 ``grads``; sets ``found_inf`` (1-element fp32) to 1 if any result
    is inf/nan, never clears it. Returns ``found_inf`` (no host synchronisation on CUDA)."""
    grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=grads[0].device if grads else "cpu")
    ext = native()
    if all(g.dtype == torch.float32 for g in grads) and _native_ok(ext, [*grads, found_inf]):
        ext.unscale_check_(grads, float(inv_scale), found_inf, _stream(found_inf))
        return found_inf
    return reference_unscale_check_(grads, inv_scale, found_inf)


# ---------------------------------------------------------------------------------------------- adamw
def reference_adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    step: int,
    param_lowp: torch.Tensor | None = None,
) -> None:
    """torch.optim.AdamW's single-tensor arithmetic, written out."""
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if param_lowp is not None:
        param_lowp.copy_(param)


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    step: int,
    param_lowp: torch.Tensor | None = None,
) -> None:
    """Fused AdamW over flat fp32 buffers (decoupled weight decay, bias correction; ``step`` counts from 1),
    optionally writing the bf16/fp16 copy of the updated params in the same pass."""
    if step < 1:
        raise ValueError(f"adamw_step_: step={step} must be >= 1 (the number of this update)")
    bufs = [param, grad, exp_avg, exp_avg_sq]
    ext = native()
    if all(b.dtype == torch.float32 for b in bufs) and _native_ok(
        ext, bufs + ([param_lowp] if param_lowp is not None else [])
    ):
        ext.adamw_step_(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            lr,
            betas[0],
            betas[1],
            eps,
            weight_decay,
            step,
            param_lowp,
            _stream(param),
        )
        return
    reference_adamw_step_(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        param_lowp=param_lowp,
    )
