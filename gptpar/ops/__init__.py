"""Fused ops. Each has a pure-torch ``reference_*`` (always available, the ground truth) and fast paths
(native C++/CUDA in ``gptpar._C``, Triton in ``gptpar.kernels``); the plain-named entry dispatches."""

from gptpar.ops.attention import attention, reference_attention_backward, reference_attention_forward
from gptpar.ops.grad import (
    adamw_step_,
    pack_cast,
    reference_adamw_step_,
    reference_pack_cast,
    reference_unpack_accumulate,
    reference_unscale_check_,
    unpack_accumulate,
    unscale_check_,
)
from gptpar.ops.mlp import act_backward, linear_act_forward, reference_linear_act
from gptpar.ops.norm import layer_norm, reference_layer_norm, reference_rms_norm, rms_norm
from gptpar.ops.wgrad import linear_act

__all__ = [
    "act_backward",
    "adamw_step_",
    "attention",
    "linear_act",
    "linear_act_forward",
    "reference_linear_act",
    "layer_norm",
    "rms_norm",
    "reference_layer_norm",
    "reference_rms_norm",
    "pack_cast",
    "reference_adamw_step_",
    "reference_attention_backward",
    "reference_attention_forward",
    "reference_pack_cast",
    "reference_unpack_accumulate",
    "reference_unscale_check_",
    "unpack_accumulate",
    "unscale_check_",
]
