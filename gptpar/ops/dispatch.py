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


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for operands of ``dtype``: fp32 operands use TF32 tensor cores only
    where torch itself allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``), else exact IEEE
    fp32, so an fp32 model computes what the fp32 reference computes. (Irrelevant to bf16/fp16.)"""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def interpreting() -> bool:
    """Whether Triton runs under its CPU interpreter (``TRITON_INTERPRET=1``): fixed small blocks, no autotuning."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def upcast_loads(dtype: torch.dtype) -> bool:
    """The kernels' ``UPCAST``: load as fp32, for bf16 under the interpreter (which mis-computes bf16)."""
    return dtype == torch.bfloat16 and interpreting()
