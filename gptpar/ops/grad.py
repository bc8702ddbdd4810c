"""Gradient ops around the optimizer step (the rest of the family arrives with the native-ops issue)."""

from __future__ import annotations

import torch

from gptpar._native import native


def reference_unscale_check_(grads: torch.Tensor, inv_scale: float) -> bool:
    """``grads *= inv_scale`` in place; True if any result is inf or nan. Plain torch (two passes)."""
    grads.mul_(inv_scale)
    return not bool(torch.isfinite(grads).all())


def unscale_check_(grads: torch.Tensor, inv_scale: float) -> bool:
    """``grads *= inv_scale`` in place on a contiguous fp32 tensor; True if any result is inf or nan.

    One pass in the native extension (CPU: OpenMP; CUDA: when built), else the reference.
    """
    ext = native()
    if ext is not None and grads.dtype == torch.float32 and grads.is_contiguous() and (grads.is_cpu or ext.with_cuda):
        return bool(ext.unscale_check_(grads, float(inv_scale)))
    return reference_unscale_check_(grads, inv_scale)
