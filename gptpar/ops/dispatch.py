"""The one switch between the Triton kernels and the torch reference.

Triton for CUDA tensors when Triton imports; the reference otherwise. ``GPTPAR_TRITON=1`` forces Triton
(on CPU that needs ``TRITON_INTERPRET=1``), ``GPTPAR_TRITON=0`` forces the reference. Read at every call.
"""

from __future__ import annotations

import os

import torch


def use_triton(x: torch.Tensor) -> bool:
    forced = os.environ.get("GPTPAR_TRITON")
    if forced is not None:
        return forced == "1"
    if not x.is_cuda:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
