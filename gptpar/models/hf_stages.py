"""transformers causal LMs as pipeline stages, with no adapter to write.

A model's units are ``[embedding, layer 0, ..., layer L-1, head]``; :class:`HFCausalLMStage` runs a
contiguous range of them and implements :class:`gptpar.parallel.pipeline.Stage`, calling the model's own
modules (its embeddings, decoder layers, final norm and LM head) exactly as the model's ``forward`` does:
the same position ids, the same causal mask (``transformers.masking_utils``, sliding-window layers
included), the same rotary embeddings, recomputed on every stage. Supported: ``GPT2LMHeadModel`` and the
Llama family (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``),
tensor-parallelised with :func:`gptpar.parallelize` or not. Anything else is refused by name: a model
whose forward does something these stages do not (logit scaling, soft-capping, extra inputs) would be
computed differently, silently.

``hf_pipeline(model, state, schedule, micro_batches)`` partitions the units over the pp group, keeps this
rank's chunks (the other stages' layers are dropped from ``model``) and returns the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptpar.errors import GptparConfigError
from gptpar.parallel.mesh import ParallelState
from gptpar.parallel.pipeline.engine import PipelineEngine
from gptpar.parallel.pipeline.partition import Partition, partition_units, profile_costs
from gptpar.parallel.pipeline.schedules import chunks_per_rank, placement

_GPT2 = ("GPT2LMHeadModel",)
_LLAMA = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _family(model: nn.Module) -> str:
    name = type(model).__name__
    if name in _GPT2:
        return "gpt2"
    if name in _LLAMA:
        return "llama"
    raise GptparConfigError(
        f"no pipeline stages for {name}: supported transformers causal LMs are {_GPT2 + _LLAMA}; for another "
        "model, write chunks implementing gptpar.pipeline.Stage (forward, hidden_shape, tied_parameters)"
    )


class _Parts:
    """The model's modules by role, for either family."""

    def __init__(self, model: nn.Module) -> None:
        self.family = _family(model)
        self.config = model.config
        if self.family == "gpt2":
            base = model.transformer
            self.embed, self.wpe, self.drop = base.wte, base.wpe, base.drop
            self.layers, self.norm, self.rotary = base.h, base.ln_f, None
        else:
            base = model.model
            self.embed, self.wpe, self.drop = base.embed_tokens, None, None
            self.layers, self.norm, self.rotary = base.layers, base.norm, base.rotary_emb
        self.head = model.lm_head
        self.tied = self.head.weight is self.embed.weight
        if getattr(model, "gptpar_sequence_parallel", False):
            raise GptparConfigError(
                "pipeline stages of a model parallelised with sequence_parallel=True are not supported: the "
                "hidden state between stages would be sequence-sharded; parallelise without it"
            )


def _layer_kind(config, i: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    if getattr(config, "model_type", "") == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


class HFCausalLMStage(nn.Module):
    """Units ``[a, b)`` of a transformers causal LM (unit 0 the embedding, ``1..L`` the layers, ``L+1`` the
    head) as a pipeline :class:`~gptpar.parallel.pipeline.Stage`. Holds the model's own modules."""

    def __init__(self, model: nn.Module, units: tuple[int, int]) -> None:
        super().__init__()
        parts = _Parts(model)
        n = len(parts.layers)
        a, b = units
        if not 0 <= a < b <= n + 2:
            raise GptparConfigError(f"units {units} are outside [0, {n + 2}) of {type(model).__name__}")
        self.family, self.config, self.units = parts.family, parts.config, (a, b)
        self.is_first, self.is_last = a == 0, b == n + 2
        self.layer_ids = list(range(max(a, 1) - 1, min(b, n + 1) - 1))
        self.layers = nn.ModuleList(parts.layers[i] for i in self.layer_ids)
        self.embed = parts.embed if self.is_first else None
        self.wpe = parts.wpe if self.is_first else None
        self.drop = parts.drop if self.is_first else None
        self.norm = parts.norm if self.is_last else None
        self.head = parts.head if self.is_last else None
        self.rotary = parts.rotary if self.layer_ids else None
        self.tied = parts.tied
        self.hidden_size = parts.config.hidden_size if hasattr(parts.config, "hidden_size") else parts.config.n_embd

    def hidden_shape(self, batch: int, seq_len: int) -> tuple[int, int, int]:
        return (batch, seq_len, self.hidden_size)

    def tied_parameters(self) -> list[torch.Tensor]:
        """The embedding (first stage) and the LM head (last stage) when the model ties them."""
        if not self.tied or (self.is_first and self.is_last):
            return []
        return [self.embed.weight] if self.is_first else ([self.head.weight] if self.is_last else [])

    def _masks(self, h: torch.Tensor, pos: torch.Tensor) -> dict:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kinds = {_layer_kind(self.config, i) for i in self.layer_ids}
        make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        unknown = kinds - make.keys()
        if unknown:
            raise GptparConfigError(f"pipeline stage: attention layer types {sorted(unknown)} are not supported")
        args = dict(config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos)
        return {k: make[k](**args) for k in kinds}

    def forward(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        *,
        loss_normalizer: torch.Tensor | float | None = None,
    ):
        if self.is_first:
            h = self.embed(x)
        else:
            h = x
        b, s = h.shape[:2]
        pos = torch.arange(s, device=h.device).unsqueeze(0)
        if self.is_first and self.family == "gpt2":
            h = self.drop(h + self.wpe(pos))
        if self.layers:
            masks = self._masks(h, pos)
            pe = self.rotary(h, position_ids=pos) if self.rotary is not None else None
            for i, layer in zip(self.layer_ids, self.layers, strict=True):
                mask = masks[_layer_kind(self.config, i)]
                if self.family == "gpt2":
                    out = layer(h, None, mask, use_cache=False, position_ids=pos)
                else:
                    out = layer(
                        h,
                        attention_mask=mask,
                        position_embeddings=pe,
                        position_ids=pos,
                        past_key_values=None,
                        use_cache=False,
                    )
                h = out[0] if isinstance(out, tuple) else out
        if not self.is_last:
            return h
        logits = self.head(self.norm(h))
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
        )
        norm = loss_normalizer if loss_normalizer is not None else (targets != ignore_index).sum().clamp(min=1)
        return logits, loss / norm


def hf_unit_costs(model: nn.Module, costs: str = "params", batch: int = 2, seq_len: int = 32) -> list[float]:
    """Per-unit costs of a transformers causal LM: ``"params"`` (parameter count; the head counts its
    matrix even when tied, since the last stage computes with it) or ``"profile"`` (one measured forward +
    backward of each unit, the generic fallback)."""
    parts = _Parts(model)
    n = len(parts.layers)

    def count(*mods) -> float:
        return float(sum(p.numel() for m in mods if m is not None for p in m.parameters()))

    if costs == "params":
        return (
            [count(parts.embed, parts.wpe)]
            + [count(layer) for layer in parts.layers]
            + [count(parts.norm) + parts.head.weight.numel()]
        )
    if costs != "profile":
        raise GptparConfigError(f"cost model {costs!r} is unknown for transformers models: 'params' or 'profile'")
    g = torch.Generator().manual_seed(0)
    dev = parts.head.weight.device
    ids = torch.randint(0, int(parts.config.vocab_size), (batch, seq_len), generator=g).to(dev)
    dtype = parts.head.weight.dtype

    def unit(i: int):
        stage = HFCausalLMStage(model, (i, i + 1))

        def run():
            if i == 0:
                stage(ids).float().sum().backward()
                return
            x = torch.randn(stage.hidden_shape(batch, seq_len), generator=g).to(dev, dtype).requires_grad_()
            out = stage(x, ids)[1] if stage.is_last else stage(x).float().sum()
            out.backward()

        return run

    was = model.training
    costs_ = profile_costs([unit(i) for i in range(n + 2)])
    model.zero_grad(set_to_none=True)
    model.train(was)
    return costs_


def hf_stages(
    model: nn.Module, state: ParallelState, v: int = 1, costs: str | list[float] = "params", style: str = "loop"
) -> tuple[list[HFCausalLMStage], Partition]:
    """This pp rank's ``v`` chunks of ``model`` (a balanced split of its units over ``pp * v`` virtual
    stages). The layers of other stages are replaced by ``nn.Identity`` in ``model`` so their memory can be
    freed: from here on, run the model through the pipeline engine, not its own forward."""
    parts = _Parts(model)
    n = len(parts.layers)
    pp = state.pp.size
    if n < pp * v:
        raise GptparConfigError(
            f"{type(model).__name__} has {n} layers, fewer than pp*v = {pp}*{v} stages (each needs a layer)"
        )
    c = list(costs) if not isinstance(costs, str) else hf_unit_costs(model, costs)
    names = ["embedding"] + [f"layer.{i}" for i in range(n)] + ["head"]
    part = partition_units(names, c, pp, v, style=style)
    chunks = [HFCausalLMStage(model, part.units(state.pp.rank, k)) for k in range(v)]
    mine = {i for ch in chunks for i in ch.layer_ids}
    for i in range(n):
        if i not in mine:
            parts.layers[i] = nn.Identity()
    has_first = any(ch.is_first for ch in chunks)
    if parts.tied and any(ch.is_last for ch in chunks) and not has_first:
        parts.head.weight.pipeline_tied_copy = True  # the second copy of the embedding: count it once in norms
    return chunks, part


def hf_pipeline(
    model: nn.Module,
    state: ParallelState,
    schedule: str = "1f1b",
    micro_batches: int = 4,
    v: int = 1,
    costs: str | list[float] = "params",
    **engine_options,
) -> tuple[PipelineEngine, Partition]:
    """Pipeline a transformers causal LM (optionally tensor-parallelised first with
    :func:`gptpar.parallelize`) over ``state``'s pp group: returns the engine (``engine.step(idx, targets)``,
    targets already shifted, ``-100`` ignored) and the partition. ``v`` chunks per rank for 'interleaved'
    (two, in a V, for 'zbv' and 'dualpipev')."""
    chunks, part = hf_stages(model, state, chunks_per_rank(schedule, v), costs, placement(schedule))
    return PipelineEngine(chunks, state, schedule, micro_batches, **engine_options), part
