"""Pipeline (layer) parallelism: balanced stages, schedules as data, one executor, overlapped P2P."""

from gptpar.parallel.pipeline.engine import PipelineEngine, StepStats
from gptpar.parallel.pipeline.partition import Partition, balance, partition_units, profile_costs, split
from gptpar.parallel.pipeline.schedules import (
    SCHEDULES,
    Action,
    build,
    chunks_per_rank,
    placement,
    simulate,
    stage_rank,
    validate,
    virtual_stage,
)
from gptpar.parallel.pipeline.stage import Stage, check_stage
from gptpar.parallel.pipeline.timeline import plot_timeline, simulated_events

__all__ = [
    "SCHEDULES",
    "Action",
    "Partition",
    "PipelineEngine",
    "StepStats",
    "balance",
    "build",
    "chunks_per_rank",
    "placement",
    "stage_rank",
    "virtual_stage",
    "Stage",
    "check_stage",
    "partition_units",
    "plot_timeline",
    "profile_costs",
    "simulate",
    "simulated_events",
    "split",
    "validate",
]
