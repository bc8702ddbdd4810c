"""The parallel dimensions, one module each, and the layout that ties them together."""

from gptpar.parallel.mesh import DIM_ORDER, Group, ParallelLayout, ParallelState, init_parallel

__all__ = ["DIM_ORDER", "Group", "ParallelLayout", "ParallelState", "init_parallel"]
