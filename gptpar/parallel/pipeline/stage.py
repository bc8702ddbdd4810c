"""The stage protocol: everything the pipeline engine needs from one model chunk, and nothing else.

A chunk is one contiguous run of a model's units (virtual stage ``vs`` of ``n``). The engine calls it as:

* ``chunk(x)`` on every stage but the last: ``x`` is the token ids ``[b, s]`` on the first stage, or the
  hidden state received from the previous stage; it returns the hidden state to send on, a tensor of
  shape ``chunk.hidden_shape(b, s)`` and the dtype of the chunk's parameters;
* ``chunk(x, targets, ignore_index, loss_normalizer=n)`` on the last stage: returns ``(output, loss)`` where
  ``loss`` is the sum of the per-token cross-entropies over targets other than ``ignore_index``, divided by
  ``n`` (a scalar tensor: the batch's count of valid targets, so microbatches add up to the token mean);
* side inputs: when the step is given packed documents' ``doc_ids``, every chunk is also called with
  ``doc_ids=`` (this microbatch's ``[b, s]`` ids); a chunk that does not take them is not given any;
* ``chunk.hidden_shape(b, s)``: the shape of the hidden state it exchanges for a microbatch of ``b``
  sequences of ``s`` tokens (every chunk of a pipeline agrees);
* ``chunk.tied_parameters()``: the tensors this chunk shares with a chunk elsewhere in the pipeline (e.g.
  the input embedding, also used by the LM head on the last stage); their gradients are summed over pp
  after backward. Sizes are taken from the tensors themselves. A tied copy that should not count twice in
  a global gradient norm carries ``pipeline_tied_copy = True``.

Implementations: :class:`gptpar.models.parallel_gpt.ParallelGPT` (gptpar's GPT) and
:class:`gptpar.models.hf_stages.HFCausalLMStage` (transformers GPT-2 and Llama-family models, built by
:func:`gptpar.pipeline.hf_pipeline`). Any ``nn.Module`` with these methods can be pipelined.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from gptpar.errors import GptparConfigError


@runtime_checkable
class Stage(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        *,
        loss_normalizer: torch.Tensor | None = None,
    ): ...

    def hidden_shape(self, batch: int, seq_len: int) -> tuple[int, ...]: ...

    def tied_parameters(self) -> list[torch.Tensor]: ...


def check_stage(chunk, where: str = "pipeline chunk") -> None:
    """Refuse a chunk that does not implement :class:`Stage`, naming what is missing."""
    missing = [m for m in ("hidden_shape", "tied_parameters", "parameters") if not callable(getattr(chunk, m, None))]
    if missing or not callable(chunk):
        raise GptparConfigError(
            f"{where} ({type(chunk).__name__}) is not a pipeline Stage: it lacks {missing or ['__call__']} "
            "(see gptpar.parallel.pipeline.stage; transformers models: gptpar.pipeline.hf_pipeline)"
        )
