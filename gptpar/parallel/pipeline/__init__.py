"""Pipeline (layer) parallelism: balanced stages, schedules as data, one executor, overlapped P2P."""

from gptpar.parallel.pipeline.engine import PipelineEngine, StepStats, build_stage_chunks, make_pipeline
from gptpar.parallel.pipeline.partition import Partition, balance, partition, profile_unit_costs, split, unit_costs
from gptpar.parallel.pipeline.schedules import SCHEDULES, Action, build, simulate, validate
from gptpar.parallel.pipeline.timeline import plot_timeline

__all__ = [
    "SCHEDULES",
    "Action",
    "Partition",
    "PipelineEngine",
    "StepStats",
    "balance",
    "build",
    "build_stage_chunks",
    "make_pipeline",
    "partition",
    "plot_timeline",
    "profile_unit_costs",
    "simulate",
    "split",
    "unit_costs",
    "validate",
]
