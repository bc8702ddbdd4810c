"""The reference GPT (single device, the ground truth) and its tensor-parallel twin."""

from gptpar.models.gpt import GPT, GPTConfig, preset
from gptpar.models.parallel_gpt import ParallelGPT, gather_grads, gather_state_dict, shard_state_dict

__all__ = ["GPT", "GPTConfig", "preset", "ParallelGPT", "gather_grads", "gather_state_dict", "shard_state_dict"]
