"""Attention that returns the log-sum-exp, the building block of ring attention.

``q [b, h, sq, d]``, ``k, v [b, hkv, sk, d]`` -> ``out [b, h, sq, d]``, ``lse [b, h, sq]`` (fp32, natural log).
Grouped-query attention: ``hkv`` divides ``h`` and query head ``i`` reads K/V head ``i // (h / hkv)``; K and
V are never repeated in memory (the reference broadcasts, the kernels index), and dK/dV sum over the group.
Masking is by global token positions: with ``causal``, query at position ``q_pos[i]`` sees key at
``k_pos[j]`` iff ``q_pos[i] >= k_pos[j]``. Positions let a ring-attention step mask a K/V block that came
from another rank, whatever the sharding (contiguous or zig-zag). A query row that sees no key gets
``out = 0`` and ``lse = -inf`` (it then contributes nothing when partial results are merged).

The backward takes the *final* ``out`` and ``lse`` (after merging every block), as FlashAttention's does,
so each block's gradient is exact without storing any probabilities:
``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K s``, ``dK = dS^T Q s``.
"""

from __future__ import annotations

import math

import torch

from gptpar.errors import GptparConfigError
from gptpar.ops.dispatch import dot_precision, interpreting, upcast_loads, use_triton


def _positions(n: int, pos: torch.Tensor | None, device) -> torch.Tensor:
    """Global token positions on ``device`` (int64, contiguous): ``pos``, or ``0..n-1``."""
    return (torch.arange(n) if pos is None else pos).to(device=device, dtype=torch.int64).contiguous()


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def kv_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per K/V head (1: multi-head; ``h``: multi-query); checks the shapes agree."""
    h, hkv = q.shape[-3], k.shape[-3]
    if hkv < 1 or h % hkv or q.shape[:-3] != k.shape[:-3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} do not fit (heads {h} vs {hkv})")
    return h // hkv


def _grouped(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[..., h, s, d] -> [..., hkv, h/hkv, s, d]`` (a view when possible)."""
    return t.reshape(*t.shape[:-3], hkv, t.shape[-3] // hkv, *t.shape[-2:])


def _scores(qf, kf, causal, q_pos, k_pos, scale, docs=None):
    """Scaled scores ``q k^T`` and the visibility mask ``[sq, sk]`` (None when nothing is masked). ``qf`` is
    grouped ``[..., hkv, g, sq, d]``, ``kf`` ``[..., hkv, 1, sk, d]``. ``docs``: ``(q_doc [b, sq], k_doc
    [b, sk])`` packed documents' ids: a key is visible only within its query's document (mask
    ``[b, 1, 1, sq, sk]``)."""
    scale = 1.0 / math.sqrt(qf.shape[-1]) if scale is None else scale
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    dev = qf.device
    mask = None
    if causal:
        mask = _positions(qf.shape[-2], q_pos, dev).view(-1, 1) >= _positions(kf.shape[-2], k_pos, dev).view(1, -1)
    if docs is not None:
        q_doc, k_doc = (d.to(dev) for d in docs)
        same = (q_doc.unsqueeze(-1) == k_doc.unsqueeze(-2))[:, None, None]
        mask = same if mask is None else same & mask
    return s, mask


def reference_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    scale: float | None = None,
    docs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch attention forward, accumulating in fp32 (or the inputs' dtype if wider); returns
    ``(out in q's dtype, lse)``. ``docs``: ``(q_doc, k_doc)`` to attend only within documents."""
    acc = _acc(q)
    kv_group(q, k)
    hkv = k.shape[-3]
    s, mask = _scores(_grouped(q.to(acc), hkv), k.to(acc).unsqueeze(-3), causal, q_pos, k_pos, scale, docs)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # Rows with no visible key: lse = -inf; subtracting it would give nan, so use 0 there (p = 0 anyway).
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, v.to(acc).unsqueeze(-3))
    return out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:-1])


def reference_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = True,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    scale: float | None = None,
    docs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (q, k/v block) pair given the final ``out``/``lse`` of the rows of ``q``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = _acc(q)
    kv_group(q, k)
    hkv = k.shape[-3]
    qf, dof = _grouped(q.to(acc), hkv), _grouped(dout.to(acc), hkv)
    kf, vf = k.to(acc).unsqueeze(-3), v.to(acc).unsqueeze(-3)
    lse = _grouped(lse.unsqueeze(-1), hkv).squeeze(-1)
    s, mask = _scores(qf, kf, causal, q_pos, k_pos, scale, docs)
    safe_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)  # p = 0 on empty rows
    p = torch.exp(s - safe_lse.unsqueeze(-1))
    if mask is not None:
        p = p.masked_fill(~mask, 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dof).sum(-3)  # summed over the query heads sharing a K/V head
    delta = (dof * _grouped(out.to(acc), hkv)).sum(dim=-1, keepdim=True)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf).sum(-3) * scale
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


INTERPRETER_BLOCK = 32  # block sizes under TRITON_INTERPRET (on GPUs they are autotuned)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()


def causal_bounds(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Where the visible (query, key) pairs lie, for causal masking by positions in any order (int32):

    * ``khi[i]``: one past the last key query ``i`` sees; ``kfull[i]``: keys ``[0, kfull[i])`` are all seen;
    * ``qlo[j]``: the first query that sees key ``j``; ``qfull[j]``: queries ``[qfull[j], Sq)`` all see it.

    The kernels loop only over blocks in these ranges, and skip the mask where a whole block is seen.
    Computed on the device without a host sync, by binary search in the prefix maxima / suffix minima of
    the positions (sorted, whatever order the positions are in)."""
    suffix_min_k = k_pos.flip(0).cummin(0).values.flip(0)
    prefix_max_k = k_pos.cummax(0).values
    prefix_max_q = q_pos.cummax(0).values
    suffix_min_q = q_pos.flip(0).cummin(0).values.flip(0)
    khi = torch.searchsorted(suffix_min_k, q_pos, right=True)
    kfull = torch.searchsorted(prefix_max_k, q_pos, right=True)
    qlo = torch.searchsorted(prefix_max_q, k_pos)
    qfull = torch.searchsorted(suffix_min_q, k_pos)
    return tuple(t.to(torch.int32) for t in (khi, kfull, qlo, qfull))


def _sorted_rows(t: torch.Tensor) -> torch.Tensor:
    """``[b, s] -> [b]``: whether each row is non-decreasing (on the device, no sync)."""
    return (
        (t[:, 1:] >= t[:, :-1]).all(dim=1)
        if t.shape[1] > 1
        else torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    )


def attention_bounds(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    docs: tuple[torch.Tensor, torch.Tensor] | None = None,
    batch: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' loop bounds: ``(key_bounds [b, 4, sq], query_bounds [b, 4, sk])`` int32, per batch
    element. For query ``i``: the keys it sees lie in ``[lo, hi)`` and it sees all of ``[flo, fhi)``; for key
    ``j`` the same over the queries that see it (rows ``lo, hi, flo, fhi``). An empty range is ``[S, 0)`` so
    that it widens nothing when a block of rows takes the union (min of ``lo``, max of ``hi``) and the
    intersection (max of ``flo``, min of ``fhi``).

    Causal masking by positions in any order (:func:`causal_bounds`); with ``docs`` (``q_doc [b, sq]``,
    ``k_doc [b, sk]``) a query's keys are also within the index range holding its document (binary
    search: packed documents' ids are non-decreasing along each row). A row whose ids are not sorted
    keeps the positions-only bounds with nothing seen whole, so every block is masked explicitly: slower,
    never wrong. Computed on the device without a host sync."""
    sq, sk, dev = q_pos.shape[0], k_pos.shape[0], q_pos.device

    def fill(n, v):
        return torch.full((n,), v, dtype=torch.int64, device=dev)

    if causal:
        khi, kfull, qlo, qfull = (t.long() for t in causal_bounds(q_pos, k_pos))
    else:
        khi, kfull, qlo, qfull = fill(sq, sk), fill(sq, sk), fill(sk, 0), fill(sk, 0)
    kb = torch.stack([fill(sq, 0), khi, fill(sq, 0), kfull])  # [4, sq]
    qb = torch.stack([qlo, fill(sk, sq), qfull, fill(sk, sq)])  # [4, sk]
    if docs is None:
        kb, qb = kb.unsqueeze(0).expand(batch, 4, sq), qb.unsqueeze(0).expand(batch, 4, sk)
    else:
        q_doc, k_doc = (d.to(device=dev, dtype=torch.int64).contiguous() for d in docs)
        batch = q_doc.shape[0]

        def narrow(bounds, lo, hi):  # [4, n] within [lo, hi) [b, n] -> [b, 4, n]
            b = bounds.unsqueeze(0).expand(batch, 4, bounds.shape[-1])
            return torch.stack(
                [b[:, 0].maximum(lo), b[:, 1].minimum(hi), b[:, 2].maximum(lo), b[:, 3].minimum(hi)], dim=1
            )

        ok = (_sorted_rows(q_doc) & _sorted_rows(k_doc)).view(batch, 1, 1)
        k_doc_b = narrow(kb, torch.searchsorted(k_doc, q_doc), torch.searchsorted(k_doc, q_doc, right=True))
        q_doc_b = narrow(qb, torch.searchsorted(q_doc, k_doc), torch.searchsorted(q_doc, k_doc, right=True))
        masked_k = torch.stack([kb[0], kb[1], fill(sq, sk), fill(sq, 0)])  # unsorted ids: nothing seen whole
        masked_q = torch.stack([qb[0], qb[1], fill(sk, sq), fill(sk, 0)])
        kb = torch.where(ok, k_doc_b, masked_k.unsqueeze(0))
        qb = torch.where(ok, q_doc_b, masked_q.unsqueeze(0))

    def normalised(b, extent):
        b = b.clone()
        empty = b[:, 0] >= b[:, 1]
        b[:, 0][empty], b[:, 1][empty] = extent, 0
        empty = b[:, 2] >= b[:, 3]
        b[:, 2][empty], b[:, 3][empty] = extent, 0
        return b.to(torch.int32).contiguous()

    return normalised(kb, sk), normalised(qb, sq)


def kernel_tiles(bounds: torch.Tensor, block_rows: int, block_cols: int) -> tuple[int, int]:
    """``(masked, unmasked)``: how many tiles the kernels visit over ``bounds [b, 4, rows]``
    (:func:`attention_bounds`) with blocks of ``block_rows`` rows by ``block_cols`` columns, per head: the
    host's mirror of the kernels' ``_ranges``, for benchmarks and tests of block skipping."""
    b, _, rows = bounds.shape
    nblk = -(-rows // block_rows)
    extent = int(bounds.max()) + 1
    pad = torch.tensor([extent, 0, 0, extent], dtype=torch.int64).view(1, 4, 1).expand(b, 4, nblk * block_rows - rows)
    blk = torch.cat([bounds.long(), pad], dim=2).view(b, 4, nblk, block_rows)
    lo = blk[:, 0].min(-1).values // block_cols * block_cols
    hi = blk[:, 1].max(-1).values
    flo = (blk[:, 2].max(-1).values + block_cols - 1) // block_cols * block_cols
    fhi = blk[:, 3].min(-1).values // block_cols * block_cols
    none = fhi <= flo
    flo, fhi = torch.where(none, lo, flo), torch.where(none, lo, fhi)

    def count(a, z):
        return ((z - a).clamp(min=0) + block_cols - 1) // block_cols

    return int((count(lo, flo) + count(fhi, hi)).sum()), int(count(flo, fhi).sum())


def _launch(autotuned, kernel, grid_of, *args, **consts):
    """The autotuned kernel on a GPU; the plain kernel with fixed blocks under the interpreter."""
    if interpreting():
        meta = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}
        kernel[grid_of(meta)](*args, **consts, **meta)
    else:
        autotuned[grid_of](*args, **consts)


def _doc_args(docs, qp, kp):
    """The kernels' document-id pointers: the ids (int64, contiguous), or the positions as unused stand-ins."""
    if docs is None:
        return qp, kp
    return tuple(d.to(device=qp.device, dtype=torch.int64).contiguous() for d in docs)


def triton_attention_forward(q, k, v, causal=True, q_pos=None, k_pos=None, scale=None, docs=None):
    """The Triton kernel (``gptpar.kernels.attention``): same contract as the reference."""
    import triton

    from gptpar.kernels import attention as kern

    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    bh, sq, sk = qf.shape[0], qf.shape[1], kf.shape[1]
    heads = q.shape[-3]
    out = torch.empty_like(qf)
    lse = torch.empty(bh, sq, dtype=torch.float32, device=q.device)
    qp, kp = _positions(sq, q_pos, q.device), _positions(sk, k_pos, q.device)
    kbounds, _ = attention_bounds(qp, kp, causal, docs, bh // heads)
    qdoc, kdoc = _doc_args(docs, qp, kp)
    _launch(
        kern.attn_fwd,
        kern.attn_fwd_kernel,
        lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), bh),
        qf,
        kf,
        vf,
        out,
        lse,
        qp,
        kp,
        qdoc,
        kdoc,
        kbounds,
        sq,
        sk,
        scale,
        kv_group(q, k),
        heads,
        CAUSAL=causal,
        DOCS=docs is not None,
        D=d,
        UPCAST=upcast_loads(q.dtype),
        PREC=dot_precision(q.dtype),
    )
    return out.view(q.shape), lse.view(q.shape[:-1])


def triton_attention_backward(dout, q, k, v, out, lse, causal=True, q_pos=None, k_pos=None, scale=None, docs=None):
    import triton

    from gptpar.kernels import attention as kern

    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(dout)
    bh, sq, sk = qf.shape[0], qf.shape[1], kf.shape[1]
    heads = q.shape[-3]
    lsef = lse.reshape(bh, sq).contiguous().float()
    delta = (dof.float() * _flat(out).float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    qp, kp = _positions(sq, q_pos, q.device), _positions(sk, k_pos, q.device)
    kbounds, qbounds = attention_bounds(qp, kp, causal, docs, bh // heads)
    qdoc, kdoc = _doc_args(docs, qp, kp)
    consts = {
        "CAUSAL": causal,
        "DOCS": docs is not None,
        "D": d,
        "UPCAST": upcast_loads(q.dtype),
        "PREC": dot_precision(q.dtype),
    }
    group = kv_group(q, k)
    _launch(
        kern.attn_bwd_dkdv,
        kern.attn_bwd_dkdv_kernel,
        lambda meta: (triton.cdiv(sk, meta["BLOCK_N"]), kf.shape[0]),
        qf,
        kf,
        vf,
        dof,
        lsef,
        delta,
        dk,
        dv,
        qp,
        kp,
        qdoc,
        kdoc,
        qbounds,
        sq,
        sk,
        scale,
        group,
        heads,
        **consts,
    )
    _launch(
        kern.attn_bwd_dq,
        kern.attn_bwd_dq_kernel,
        lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), bh),
        qf,
        kf,
        vf,
        dof,
        lsef,
        delta,
        dq,
        qp,
        kp,
        qdoc,
        kdoc,
        kbounds,
        sq,
        sk,
        scale,
        group,
        heads,
        **consts,
    )
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


def flash_kernel_applies(x: torch.Tensor, head_dim: int) -> bool:
    """Whether attention on ``x``'s device with heads of ``head_dim`` runs the Triton flash kernel."""
    return use_triton(x) and head_dim in (16, 32, 64, 128)


def _triton(q: torch.Tensor) -> bool:
    return flash_kernel_applies(q, q.shape[-1]) and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def attention_forward(q, k, v, causal=True, q_pos=None, k_pos=None, scale=None, docs=None):
    """Dispatching forward: the Triton kernel for CUDA tensors (or ``GPTPAR_TRITON=1``), else the reference."""
    if _triton(q):
        return triton_attention_forward(q, k, v, causal, q_pos, k_pos, scale, docs)
    return reference_attention_forward(q, k, v, causal, q_pos, k_pos, scale, docs)


def attention_backward(dout, q, k, v, out, lse, causal=True, q_pos=None, k_pos=None, scale=None, docs=None):
    """Dispatching backward for one block; see module docstring."""
    if _triton(q):
        return triton_attention_backward(dout, q, k, v, out, lse, causal, q_pos, k_pos, scale, docs)
    return reference_attention_backward(dout, q, k, v, out, lse, causal, q_pos, k_pos, scale, docs)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, q_pos, k_pos, scale, docs=None):
        out, lse = attention_forward(q, k, v, causal, q_pos, k_pos, scale, docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, q_pos, k_pos, scale, docs)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    scale: float | None = None,
    docs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention returning ``(out, lse)``; saves only q, k, v, out, lse for backward
    (the probabilities are recomputed), like FlashAttention. ``docs``: ``(q_doc [b, sq], k_doc [b, sk])``
    packed documents' ids: attention only within a document."""
    return _Attention.apply(q, k, v, causal, q_pos, k_pos, scale, docs)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at each document: ``doc_ids [b, s]`` (non-decreasing along s: packed
    documents) -> ``[b, s]`` int64, each token's index within its own document."""
    s = doc_ids.shape[-1]
    idx = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention within documents: ``doc_ids [b, s]`` -> boolean ``[b, 1, s, s]``, True where query
    i may see key j (``j <= i`` and the same document)."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)).logical_and(causal).unsqueeze(1)


def check_documents(doc_ids: torch.Tensor, idx: torch.Tensor) -> None:
    """Refuse document ids that do not describe packed documents of ``idx [b, s]``."""
    if doc_ids.shape != idx.shape:
        raise GptparConfigError(f"doc_ids {tuple(doc_ids.shape)} must have the token ids' shape {tuple(idx.shape)}")
    if doc_ids.dtype.is_floating_point or (doc_ids[..., 1:] < doc_ids[..., :-1]).any():
        raise GptparConfigError("doc_ids must be integers, non-decreasing along the sequence (packed documents)")
