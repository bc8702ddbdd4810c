"""``gptpar.pipeline``: the public face of pipeline parallelism. The model-agnostic machinery
(:mod:`gptpar.parallel.pipeline`: schedules, the engine, the :class:`Stage` protocol, the partitioner) plus
the model side: gptpar's GPT (:mod:`gptpar.models.stages`) and transformers causal LMs
(:mod:`gptpar.models.hf_stages`)."""

from gptpar.models.hf_stages import HFCausalLMStage, hf_pipeline, hf_stages, hf_unit_costs
from gptpar.models.stages import (
    build_stage_chunks,
    make_pipeline,
    partition,
    profile_unit_costs,
    unit_costs,
    unit_names,
)
from gptpar.parallel.pipeline import *  # noqa: F403
from gptpar.parallel.pipeline import __all__ as _machinery

__all__ = [
    *_machinery,
    "HFCausalLMStage",
    "build_stage_chunks",
    "hf_pipeline",
    "hf_stages",
    "hf_unit_costs",
    "make_pipeline",
    "partition",
    "profile_unit_costs",
    "unit_costs",
    "unit_names",
]
