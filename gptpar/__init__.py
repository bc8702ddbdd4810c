"""gptpar: train GPT models that do not fit on one device (tensor, sequence, pipeline and data parallelism)."""

from gptpar.errors import CollectiveTimeoutError, GptparConfigError, GptparError
from gptpar.models import GPT, GPTConfig, ParallelGPT
from gptpar.parallel import ParallelLayout, ParallelState, init_parallel
from gptpar.parallelize import clip_grad_norm_, from_pretrained, parallelize, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "CollectiveTimeoutError",
    "GptparConfigError",
    "GptparError",
    "GPT",
    "GPTConfig",
    "ParallelGPT",
    "ParallelLayout",
    "ParallelState",
    "clip_grad_norm_",
    "from_pretrained",
    "init_parallel",
    "parallelize",
    "save_pretrained",
]
