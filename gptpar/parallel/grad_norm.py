"""The global gradient norm of a model split over every parallel dimension, and clipping by it.

Each parameter counts once: tp-sharded parameters from every tp rank, tp-replicated ones from tp rank 0
only, rows a tp subgroup shares (K/V heads when tp > n_kv_head) from the subgroup's first rank, a
pipeline-tied second copy never (:func:`gptpar.parallel.tensor.norm_span`); pipeline stages add their own.
"""

from __future__ import annotations

import torch

from gptpar.parallel import comm
from gptpar.parallel.mesh import ParallelState


def norm_span(p: torch.Tensor, state: ParallelState) -> tuple[int, int]:
    """The flat elements of this rank's copy of ``p`` that add to the global gradient norm
    (:func:`gptpar.parallel.tensor.norm_span`: every element counted once across tp and pipeline copies)."""
    from gptpar.parallel.tensor import norm_span as span

    return span(p, state.tp.rank)


@torch.no_grad()
def global_grad_norm(params, state: ParallelState) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, each parameter counted once across every parallel dim.

    tp-sharded parameters contribute from every tp rank; tp-replicated ones only from tp rank 0; each
    pipeline stage contributes its own parameters (a tied embedding's second copy, on the last stage, is
    skipped); gradients replicated over dp and cp (after their reduction) are counted once.
    """
    sq = torch.zeros((), dtype=torch.float32, device=state.device)
    for p in params:
        lo, hi = norm_span(p, state) if p.grad is not None else (0, 0)
        if hi > lo:
            sq += p.grad.detach().reshape(-1)[lo:hi].float().pow(2).sum()
    comm.all_reduce(sq, state.tp)
    comm.all_reduce(sq, state.pp)
    return sq.sqrt()


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, state: ParallelState, eps: float = 1e-6) -> torch.Tensor:
    """Scale gradients so the global norm (:func:`global_grad_norm`) is at most ``max_norm``; returns the
    norm before clipping (the same on every rank). Same rule as ``torch.nn.utils.clip_grad_norm_``."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, state)
    coef = torch.clamp(max_norm / (norm + eps), max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.dtype))
    return norm
