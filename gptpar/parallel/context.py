"""Context (token) parallelism: the sequence is split across the ``cp`` group.

Sharding (:func:`seq_shards`): ``"contiguous"`` gives rank r tokens ``[r*s/p, (r+1)*s/p)``; ``"zigzag"``
splits the sequence into ``2p`` chunks and gives rank r chunks ``r`` and ``2p-1-r``, so that under a
causal mask every rank does the same attention work (rank 0's early queries pair with its late ones).

Attention over a sharded sequence, two ways:

* :func:`ring_attention` — each rank keeps its queries; K/V blocks travel around the ring. The next
  block's send/recv is posted before the current block's compute (overlap). Partial results merge through
  their log-sum-exp in fp32. Backward sends dK/dV around the ring with the blocks; dQ accumulates locally.
  Work is planned per (query chunk, key chunk) pair: fully masked pairs are skipped, fully visible ones run
  unmasked, and only diagonal pairs apply the causal mask, so zig-zag ranks do equal, minimal work.
* :func:`ulysses_attention` — all-to-all from sequence-sharded ``[b, h, s/p, d]`` to head-sharded
  ``[b, h/p, s, d]``, full-sequence attention on the local heads, and all-to-all back. Needs ``h % p == 0``.

Both call :mod:`gptpar.ops.attention` for the inner step (where the Triton kernel slots in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptpar.errors import GptparConfigError
from gptpar.ops.attention import attention, attention_backward, attention_forward
from gptpar.parallel import comm
from gptpar.parallel.mesh import Group

SHARDINGS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class SeqShard:
    """The global token positions one rank holds, as contiguous ``(start, length)`` chunks in local order."""

    chunks: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return sum(n for _, n in self.chunks)

    def positions(self, device=None) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.chunks])


def seq_shards(seq_len: int, cp: int, sharding: str = "zigzag", multiple_of: int = 1) -> list[SeqShard]:
    """Every cp rank's :class:`SeqShard` for a sequence of ``seq_len`` tokens.

    ``multiple_of``: each rank's length must also divide by this (e.g. tp, for sequence parallelism).
    Raises :class:`GptparConfigError` naming the rule if the sequence does not split evenly.
    """
    if sharding not in SHARDINGS:
        raise GptparConfigError(f"cp sharding {sharding!r} is unknown; expected one of {SHARDINGS}")
    pieces = 2 * cp if (sharding == "zigzag" and cp > 1) else cp
    if seq_len % pieces:
        raise GptparConfigError(
            f"sequence length {seq_len} is not divisible by {pieces} "
            f"({'2*cp for zig-zag sharding' if pieces != cp else 'cp'}, cp={cp}): blocks would be uneven"
        )
    if (seq_len // cp) % multiple_of:
        raise GptparConfigError(
            f"sequence length {seq_len} gives {seq_len // cp} tokens per cp rank, not divisible by tp={multiple_of} "
            "(sequence parallelism splits each rank's tokens across tp)"
        )
    chunk = seq_len // pieces
    if pieces == cp:
        return [SeqShard(((r * chunk, chunk),)) for r in range(cp)]
    return [SeqShard(((r * chunk, chunk), ((2 * cp - 1 - r) * chunk, chunk))) for r in range(cp)]


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class _Pair:
    q_slice: tuple[int, int]  # local (offset, length) of the query chunk
    k_slices: tuple[tuple[int, int], ...]  # local (offset, length) of the visible key chunks
    q_pos: torch.Tensor | None  # global positions, only when a mask is needed
    k_pos: torch.Tensor | None
    docs: tuple[torch.Tensor, torch.Tensor] | None = None  # (q_doc [b, ql], k_doc [b, kl]) packed documents


def _plan(q_shard: SeqShard, k_shard: SeqShard, causal: bool, doc_ids: torch.Tensor | None = None) -> list[_Pair]:
    """Which query chunks see which key chunks, and whether the causal mask is needed for them. With packed
    documents (``doc_ids [b, s]``, the whole sequence's), a key chunk whose documents end before the query
    chunk's first document (in every row) is skipped, not computed and masked."""
    pairs = []
    q_off = 0
    ids = doc_ids.cpu() if doc_ids is not None else None  # planning on the host: no sync per block pair
    for qs, ql in q_shard.chunks:
        k_off, visible, masked = 0, [], False
        for ks, kl in k_shard.chunks:
            meets = doc_ids is None or bool((ids[:, ks + kl - 1] >= ids[:, qs]).any())
            if not meets and (not causal or ks + kl - 1 <= qs):
                pass  # the key chunk's documents all ended before the query chunk's began
            elif not causal or ks + kl - 1 <= qs:  # every key precedes every query
                visible.append(((k_off, kl), (ks, kl)))
            elif ks <= qs + ql - 1:  # overlapping ranges: the diagonal, needs the mask
                visible.append(((k_off, kl), (ks, kl)))
                masked = True
            k_off += kl
        if visible:
            q_pos = k_pos = docs = None
            if masked:
                q_pos = torch.arange(qs, qs + ql)
                k_pos = torch.cat([torch.arange(s, s + n) for _, (s, n) in visible])
            if doc_ids is not None:
                k_doc = torch.cat([doc_ids[:, s : s + n] for _, (s, n) in visible], dim=1)
                docs = (doc_ids[:, qs : qs + ql], k_doc)
            pairs.append(_Pair((q_off, ql), tuple(sl for sl, _ in visible), q_pos, k_pos, docs))
        q_off += ql
    return pairs


def attention_work(shards: list[SeqShard], rank: int, causal: bool = True, doc_ids: torch.Tensor | None = None) -> int:
    """Query-key pairs rank ``rank`` computes over a whole ring pass (a FLOP proxy for load balance)."""
    return sum(
        pair_q * sum(n for _, n in pair.k_slices)
        for src in range(len(shards))
        for pair in _plan(shards[rank], shards[src], causal, doc_ids)
        for pair_q in (pair.q_slice[1],)
    )


def _select(t: torch.Tensor, slices: tuple[tuple[int, int], ...]) -> torch.Tensor:
    if len(slices) == 1:
        o, n = slices[0]
        return t[..., o : o + n, :]
    return torch.cat([t[..., o : o + n, :] for o, n in slices], dim=-2)


def _merge_(out, lse, blk_out, blk_lse, sl):
    """Merge a block's (out, lse) into the running fp32 accumulators for query rows ``sl``, in place."""
    o, n = sl
    acc, acc_lse = out[..., o : o + n, :], lse[..., o : o + n]
    new_lse = torch.logaddexp(acc_lse, blk_lse)
    ref = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)  # rows seeing nothing yet
    acc.mul_(torch.exp(acc_lse - ref).unsqueeze(-1)).add_(blk_out.float() * torch.exp(blk_lse - ref).unsqueeze(-1))
    acc_lse.copy_(new_lse)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, shards, causal, scale, doc_ids=None):
        p, r = group.size, group.rank
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        plans = []
        for i in range(p):
            src = (r - i) % p
            if i < p - 1:
                nxt, handle = comm.ring_shift(kv, group, tag=0)  # posted before this block's compute
            plan = _plan(shards[r], shards[src], causal, doc_ids)
            plans.append(plan)
            for pair in plan:
                o, n = pair.q_slice
                blk_out, blk_lse = attention_forward(
                    q[..., o : o + n, :],
                    _select(kv[0], pair.k_slices),
                    _select(kv[1], pair.k_slices),
                    pair.q_pos is not None,
                    pair.q_pos,
                    pair.k_pos,
                    scale,
                    pair.docs,
                )
                _merge_(out, lse, blk_out, blk_lse, pair.q_slice)
            if i < p - 1:
                handle.wait()
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.plans, ctx.scale = group, plans, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        group, p = ctx.group, ctx.group.size
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        # Step 0 (this rank's own block) accumulates locally. From step 1 on, a dK/dV accumulator travels
        # with each block and reaches the block's owner after p-1 shifts: the minimum traffic.
        dkv_own = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros_like(dkv_own)
        for i in range(p):
            if i < p - 1:
                kv_next, kv_handle = comm.ring_shift(kv, group, tag=0)  # posted before this block's compute
            target = dkv_own if i == 0 else dkv
            for pair in ctx.plans[i]:
                o, n = pair.q_slice
                dq_b, dk_b, dv_b = attention_backward(
                    dout[..., o : o + n, :],
                    q[..., o : o + n, :],
                    _select(kv[0], pair.k_slices),
                    _select(kv[1], pair.k_slices),
                    out[..., o : o + n, :],
                    lse[..., o : o + n],
                    pair.q_pos is not None,
                    pair.q_pos,
                    pair.k_pos,
                    ctx.scale,
                    pair.docs,
                )
                dq[..., o : o + n, :] += dq_b
                at = 0
                for ko, kn in pair.k_slices:
                    target[0][..., ko : ko + kn, :] += dk_b[..., at : at + kn, :]
                    target[1][..., ko : ko + kn, :] += dv_b[..., at : at + kn, :]
                    at += kn
            if i >= 1:
                dkv, d_handle = comm.ring_shift(dkv, group, tag=1)
                d_handle.wait()
            if i < p - 1:
                kv_handle.wait()
                kv = kv_next
        dkv = dkv_own + dkv if p > 1 else dkv_own
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    shards: list[SeqShard],
    causal: bool = True,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention over ``group`` (cp). In ``q, k, v [b, h, s/p, d]`` holding ``shards[rank]``'s tokens;
    out ``(out [b, h, s/p, d], lse [b, h, s/p] fp32)``. Collectives: ``p-1`` K/V ring shifts forward, each
    posted before the compute it overlaps; ``p-1`` K/V and ``p-1`` dK/dV (fp32) ring shifts backward.
    ``doc_ids [b, s]`` (the whole sequence's, on every rank): attention only within packed documents;
    blocks whose documents do not meet are skipped."""
    if group.size == 1:
        docs = None if doc_ids is None else (doc_ids, doc_ids)
        return attention(q, k, v, causal, None, None, scale, docs)
    return _RingAttention.apply(q, k, v, group, shards, causal, scale, doc_ids)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: Group,
    shards: list[SeqShard],
    causal: bool = True,
    scale: float | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSpeed-Ulysses attention over ``group`` (cp). ``doc_ids [b, s]``: attention only within packed
    documents. In ``q [b, h, s/p, d]``, ``k, v [b, hkv, s/p, d]``,
    out ``[b, h, s/p, d]``. Collectives: three all-to-alls forward (q, k, v) and one back (out); the same,
    reversed, in backward. Grouped-query K/V heads are split across cp with their query heads; with fewer
    K/V heads than cp, each is repeated to one per cp rank first (its gradient sums back)."""
    p = group.size
    if q.shape[1] % p:
        raise GptparConfigError(
            f"Ulysses attention needs the local heads ({q.shape[1]}) divisible by cp={p}: heads are split across cp"
        )
    hkv = k.shape[1]
    if hkv % p:
        if p % hkv:
            raise GptparConfigError(
                f"Ulysses attention with {hkv} K/V heads and cp={p}: cp must divide them or be a multiple of them"
            )
        k, v = k.repeat_interleave(p // hkv, dim=1), v.repeat_interleave(p // hkv, dim=1)
    if p == 1:
        docs = None if doc_ids is None else (doc_ids, doc_ids)
        return attention(q, k, v, causal, None, None, scale, docs)[0]
    q, k, v = (comm.all_to_all_region(t, group, scatter_dim=1, gather_dim=2) for t in (q, k, v))
    pos = torch.cat([s.positions() for s in shards])  # the gathered sequence, in rank order
    docs = None if doc_ids is None else (doc_ids[:, pos.to(doc_ids.device)],) * 2
    out, _ = attention(q, k, v, causal, pos, pos, scale, docs)
    return comm.all_to_all_region(out, group, scatter_dim=2, gather_dim=1)
