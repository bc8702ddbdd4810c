"""gptpar's own GPT as pipeline stages: its units (``[embedding, block 0, ..., block L-1, head]``) and their
costs for the model-agnostic partitioner, and :class:`~gptpar.models.parallel_gpt.ParallelGPT` chunks
(which implement :class:`gptpar.parallel.pipeline.Stage`) run by the model-agnostic engine.

Cost models: ``"params"`` (parameter count; the head counts its V x h matrix even when tied, since the
last stage computes with it), ``"flops"`` (matmul FLOPs per token, attention included), or ``"profile"``
(measured forward + backward time of each unit on this machine).
"""

from __future__ import annotations

import torch
from torch import nn

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPT, GPTConfig, rope_for
from gptpar.parallel.mesh import ParallelState
from gptpar.parallel.pipeline.engine import PipelineEngine
from gptpar.parallel.pipeline.partition import Partition, partition_units, profile_costs
from gptpar.parallel.pipeline.schedules import chunks_per_rank, placement

COST_MODELS = ("params", "flops", "profile")


def unit_names(config: GPTConfig) -> list[str]:
    return ["embedding"] + [f"block.{i}" for i in range(config.n_layer)] + ["head"]


def unit_costs(config: GPTConfig, model: str = "params", seq_len: int | None = None) -> list[float]:
    h, f, v, L = config.d_model, config.ffn_hidden, config.padded_vocab, config.n_layer
    s = seq_len or config.seq_len
    if model == "params":
        u = config.unit_params()
        return [u["embedding"]] + [u["block"]] * L + [u["norm"] + u["head"]]
    if model == "flops":  # forward matmul FLOPs per token (x3 for fwd+bwd cancels in the split)
        fc = 2 * f if config.activation == "swiglu" else f
        qkv = config.q_size + 2 * config.kv_size
        per_block = 2 * (qkv * h + config.q_size * h + fc * h + f * h) + 2 * 2 * s * config.q_size  # + QK^T, PV
        return [h] + [per_block] * L + [2 * v * h]
    if model == "profile":
        return profile_unit_costs(config, seq_len=s)
    raise GptparConfigError(f"cost model {model!r} is unknown; expected one of {COST_MODELS} or a list of costs")


def profile_unit_costs(config: GPTConfig, batch: int = 2, seq_len: int | None = None, reps: int = 3) -> list[float]:
    """Measured forward + backward seconds of each unit (median of ``reps``) on this process's device."""
    s = seq_len or config.seq_len
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (batch, s))

    def emb():
        x = model.wte(idx)
        if config.position == "learned":
            x = x + model.wpe(torch.arange(s))
        x.sum().backward()

    x0 = torch.randn(batch, s, config.d_model, requires_grad=True)
    rope = rope_for(config, torch.arange(s), x0.device)

    def block(b):
        return lambda: b(x0, rope).sum().backward()

    def head():
        logits = model.lm_head(model.ln_f(x0))
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()

    return profile_costs([emb] + [block(b) for b in model.blocks] + [head], reps)


def partition(
    config: GPTConfig, pp: int, v: int = 1, costs: str | list[float] = "params", style: str = "loop"
) -> Partition:
    """Balanced split of ``config``'s units over ``pp * v`` virtual stages, placed on ranks by ``style``."""
    names = unit_names(config)
    if config.n_layer < pp:
        raise GptparConfigError(f"n_layer={config.n_layer} is less than pp={pp} (every pipeline stage needs a layer)")
    c = list(costs) if not isinstance(costs, str) else unit_costs(config, costs)
    return partition_units(names, c, pp, v, style=style)


def build_stage_chunks(config: GPTConfig, state: ParallelState, part: Partition, **options) -> list[nn.Module]:
    """This pp rank's model chunks (only their weights are ever materialised)."""
    from gptpar.models.parallel_gpt import ParallelGPT

    return [ParallelGPT(config, state, units=part.units(state.pp.rank, c), **options) for c in range(part.v)]


def make_pipeline(
    config: GPTConfig,
    state: ParallelState,
    schedule: str = "1f1b",
    micro_batches: int = 4,
    v: int = 1,
    costs: str | list[float] = "params",
    record: bool = False,
    negotiate_shapes: bool = False,
    measure_memory: bool = False,
    **options,
) -> tuple[PipelineEngine, Partition]:
    """Partition ``config`` over the pp group, build this rank's chunks, and return the engine.
    ``options`` go to each chunk's :class:`~gptpar.models.parallel_gpt.ParallelGPT`."""
    part = partition(config, state.pp.size, chunks_per_rank(schedule, v), costs, placement(schedule))
    chunks = build_stage_chunks(config, state, part, **options)
    return PipelineEngine(chunks, state, schedule, micro_batches, negotiate_shapes, record, measure_memory), part
