"""Fused ops. Each op has a pure-torch ``reference_*`` (always available, the ground truth) and fast paths
(native C++/CUDA in ``gptpar._C``, Triton in ``gptpar.kernels``); the plain-named entry dispatches."""

from gptpar.ops.grad import reference_unscale_check_, unscale_check_

__all__ = ["unscale_check_", "reference_unscale_check_"]
