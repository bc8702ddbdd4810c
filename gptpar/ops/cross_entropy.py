"""Cross-entropy over a vocabulary slice: the Triton launchers behind
:func:`gptpar.parallel.tensor.vocab_parallel_cross_entropy` (which adds the collectives).

* :func:`ce_row_stats` — per row of ``logits [N, V_local]`` (vocabulary ids ``start..start+V_local``): the
  row maximum, the sum of ``exp(logit - max)`` and the target's logit (0 where the target is elsewhere),
  in one pass over the logits;
* :func:`ce_grad_` — overwrite ``logits`` with the gradient ``d * (softmax - onehot(target))`` given the
  global row maxima and sums of exps.
"""

from __future__ import annotations

import torch


def _block(local_v: int) -> int:
    import triton

    return min(triton.next_power_of_2(local_v), 4096)


def ce_row_stats(logits: torch.Tensor, target: torch.Tensor, start: int):
    """``(row_max, sum_exp, target_logit)``, fp32 ``[N]`` each, for contiguous ``logits [N, V_local]``."""
    from gptpar.kernels.cross_entropy import ce_stats_kernel

    n, local_v = logits.shape
    row_max = torch.empty(n, dtype=torch.float32, device=logits.device)
    sum_exp, target_logit = torch.empty_like(row_max), torch.empty_like(row_max)
    ce_stats_kernel[(n,)](
        logits, target, row_max, sum_exp, target_logit, logits.stride(0), local_v, start, BLOCK=_block(local_v)
    )
    return row_max, sum_exp, target_logit


def ce_grad_(
    logits: torch.Tensor,
    target: torch.Tensor,
    global_max: torch.Tensor,
    sum_exp: torch.Tensor,
    d: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """In place: ``logits`` becomes the gradient of the per-row losses weighted by ``d [N]`` (fp32)."""
    from gptpar.kernels.cross_entropy import ce_grad_kernel

    ce_grad_kernel[(logits.shape[0],)](
        logits, target, global_max, sum_exp, d, logits.stride(0), logits.shape[1], start, BLOCK=_block(logits.shape[1])
    )
    return logits
