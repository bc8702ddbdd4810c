"""Sharding metadata, at the bottom of the layers: what a tensor-parallel parameter's spec says and how to go
between full and per-rank tensors under it. Pure functions of tensors (no process groups), so the
reference model, checkpoints, the Hugging Face converters and :mod:`gptpar.parallel` all share them.

Every sharded parameter carries its spec as attributes (``tp_dim``: the dimension split across tp,
``tp_chunks``: how many logical blocks that dimension holds, e.g. 3 for a fused q/k/v weight, each
block split separately so that rank r holds the r-th slice of q, of k and of v).
"""

from __future__ import annotations

import torch

from gptpar.errors import GptparConfigError

# A spec is ``(dim, chunks)``. ``chunks`` is either an int k (``dim`` holds k equal blocks, each split
# across tp) or a tuple of head counts, one per block (``dim`` holds blocks of ``heads * unit`` rows, unit =
# size / sum(heads)): a block whose heads divide by tp is split across tp; a block with fewer heads than tp
# (tp a multiple of them) keeps one head per rank, each head on the tp/heads consecutive ranks whose query
# heads use it (grouped-query attention's K/V when tp > n_kv_head, Megatron's rule). The spec does not
# depend on tp, so checkpoints record it once and reshard to any tp.
Chunks = int | tuple[int, ...]


def set_tp_spec(param: torch.Tensor, dim: int | None, chunks: Chunks = 1) -> torch.Tensor:
    """Mark ``param`` as split along ``dim`` across tp (``None``: replicated across tp)."""
    param.tp_dim = dim
    param.tp_chunks = chunks if isinstance(chunks, int) else tuple(int(c) for c in chunks)
    return param


def tp_spec(param: torch.Tensor) -> tuple[int | None, Chunks]:
    return getattr(param, "tp_dim", None), getattr(param, "tp_chunks", 1)


def head_split(heads: int, size: int) -> tuple[int, int]:
    """``(heads per rank, ranks sharing each head)`` for ``heads`` heads over a tp group of ``size``."""
    if heads % size == 0:
        return heads // size, 1
    if size % heads == 0:
        return 1, size // heads
    raise GptparConfigError(
        f"{heads} heads cannot be split over tp={size}: tp must divide the heads, or be a multiple of them "
        "(each head then replicated on tp/heads ranks)"
    )


def _blocks(length: int, chunks: Chunks) -> list[tuple[int, int]]:
    """``(rows, heads)`` per block of a dimension of ``length`` under ``chunks``."""
    if isinstance(chunks, int):
        if length % chunks:
            raise GptparConfigError(f"dimension of {length} is not divisible by chunks={chunks}")
        return [(length // chunks, 0)] * chunks
    total = sum(chunks)
    if length % total:
        raise GptparConfigError(f"dimension of {length} is not divisible into {total} heads {tuple(chunks)}")
    unit = length // total
    return [(h * unit, h) for h in chunks]


def local_length(length: int, chunks: Chunks, size: int) -> int:
    """This rank's length of a dimension of ``length`` split under ``chunks`` across ``size`` ranks."""
    if isinstance(chunks, int):
        if length % (chunks * size):
            raise GptparConfigError(
                f"dimension of {length} (in {chunks} block(s)) is not divisible by chunks*tp = {chunks}*{size}: "
                "each block's rows are split across tp"
            )
        return length // size
    return sum(rows // heads * head_split(heads, size)[0] for rows, heads in _blocks(length, chunks))


def full_length(local: int, chunks: Chunks, size: int) -> int:
    """Inverse of :func:`local_length`: the full length of a dimension of which a rank holds ``local``."""
    if isinstance(chunks, int):
        return local * size
    return local // sum(head_split(h, size)[0] for h in chunks) * sum(chunks)


def shard_tensor(full: torch.Tensor, dim: int | None, chunks: Chunks, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full`` under spec (``dim``, ``chunks``) for a group of ``size``."""
    if dim is None or size == 1:
        return full.clone()
    if isinstance(chunks, int) and full.shape[dim] % (chunks * size):
        raise GptparConfigError(
            f"cannot shard a tensor of shape {tuple(full.shape)}: dim {dim} ({full.shape[dim]}) is not divisible by "
            f"chunks*tp = {chunks}*{size}"
        )
    out = []
    at = 0
    for rows, heads in _blocks(full.shape[dim], chunks):
        block = full.narrow(dim, at, rows)
        at += rows
        if heads == 0:
            out.append(block.chunk(size, dim=dim)[rank])
        else:
            per_rank, sharing = head_split(heads, size)
            out.append(block.chunk(heads // per_rank, dim=dim)[rank // sharing])
    return torch.cat(out, dim=dim).contiguous()


def unshard_tensor(pieces: list[torch.Tensor], dim: int | None, chunks: Chunks) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full tensor from every rank's piece (in rank order)."""
    if dim is None or len(pieces) == 1:
        return pieces[0].clone()
    size = len(pieces)
    if isinstance(chunks, int):
        per_rank = [p.chunk(chunks, dim=dim) for p in pieces]
        return torch.cat([torch.cat([pr[c] for pr in per_rank], dim=dim) for c in range(chunks)], dim=dim)
    unit_local = pieces[0].shape[dim] // sum(head_split(h, size)[0] for h in chunks)
    out, at = [], 0
    for heads in chunks:
        per_rank, sharing = head_split(heads, size)
        n = per_rank * unit_local
        out.extend(pieces[r].narrow(dim, at, n) for r in range(0, size, sharing))
        at += n
    return torch.cat(out, dim=dim)


def replicated_rows(local: int, chunks: Chunks, size: int) -> tuple[int, int]:
    """For a local dimension of ``local`` rows under a head spec over ``size`` ranks: ``(leading rows that are
    this rank's alone, ranks sharing each row after them)``; ``(local, 1)`` when nothing is replicated.
    Replicated blocks come last (K/V after Q) and are shared by equally many ranks."""
    if isinstance(chunks, int):
        return local, 1
    splits = [head_split(h, size) for h in chunks]
    unit = local // sum(per_rank for per_rank, _ in splits)
    first = next((i for i, (_, s) in enumerate(splits) if s > 1), len(splits))
    sharing = {s for _, s in splits[first:]}
    if len(sharing) > 1 or 1 in sharing:
        raise GptparConfigError(f"head spec {chunks} over tp={size}: replicated blocks must come last, equally shared")
    distinct = sum(per_rank for per_rank, _ in splits[:first]) * unit
    return distinct, (sharing.pop() if sharing else 1)
