"""The pipeline executor: runs any schedule's per-rank action list (:mod:`.schedules`) over this rank's
model chunks, with point-to-point transfers (:mod:`.p2p`) posted ahead of the compute they overlap.

One :meth:`PipelineEngine.step` runs forward and backward of every microbatch of a global batch and
leaves the accumulated gradients in ``.grad`` (each microbatch's summed token losses over the batch's
count of valid tokens, so the gradients are those of the token-weighted mean over the batch, however the
ignored targets fall); the optimizer step is the caller's.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from gptpar.errors import GptparConfigError
from gptpar.ops.wgrad import defer_weight_grads, deferrable_weight_grads
from gptpar.parallel import comm
from gptpar.parallel.mesh import ParallelState
from gptpar.parallel.pipeline.p2p import StageP2P
from gptpar.parallel.pipeline.schedules import Action, build, chunks_per_rank, placement, stage_rank, virtual_stage
from gptpar.parallel.pipeline.stage import check_stage


@dataclass
class StepStats:
    """What one step measured on this rank."""

    total_s: float = 0.0
    blocked_s: float = 0.0  # waiting for receives and for sends to complete
    peak_in_flight: int = 0  # microbatches whose activations were held at once
    peak_activation_bytes: int = 0  # bytes saved for backward, held at once (with measure_memory)
    peak_output_bytes: int = 0  # bytes of stage outputs the engine holds for backward, at once (measure_memory)
    events: list = field(default_factory=list)  # (kind, mb, chunk, t0, t1) relative to step start

    @property
    def hidden_comm_fraction(self) -> float:
        """Share of the step not spent blocked on communication."""
        return 1.0 - self.blocked_s / self.total_s if self.total_s else 0.0


# autograd's engine entry point (torch 2.11 and 2.13 have it); without it outputs are kept, not released
_ENGINE = getattr(torch.autograd.Variable, "_execution_engine", None)
_RUN_BACKWARD = getattr(_ENGINE, "run_backward", None)


def _release_data(y: torch.Tensor) -> None:
    """Free a sent stage output's values and keep its autograd graph (Megatron's deallocated pipeline
    outputs): from here only the send holds them, until it completes. Without it each microbatch's output
    stays until its backward: ``m`` of them under GPipe."""
    if y._base is None and _RUN_BACKWARD is not None:  # a view's values belong to its base: nothing to free
        y.data = torch.empty((1,), dtype=y.dtype, device=y.device)


def _backward(y: torch.Tensor, grad: torch.Tensor | None) -> None:
    """``torch.autograd.backward(y, grad)`` for a ``y`` whose values :func:`_release_data` freed: the
    engine's own entry point, which does not compare ``y``'s (now one-element) shape with ``grad``'s."""
    if grad is None or _RUN_BACKWARD is None:  # the loss (never released), or a torch without the entry point
        torch.autograd.backward(y, grad)
        return
    _RUN_BACKWARD((y,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)


class PipelineEngine:
    """Runs ``schedule`` over ``chunks``: this rank's ``v`` model chunks (chunk c = virtual stage c*pp+rank;
    for ZB-V and DualPipeV two chunks in a V, stages ``rank`` and ``2pp-1-rank``), each a
    :class:`~gptpar.parallel.pipeline.stage.Stage`. Collective over pp at construction (the ranks agree
    on the shape of the tensors tied across stages)."""

    def __init__(
        self,
        chunks: list[nn.Module],
        state: ParallelState,
        schedule: str = "1f1b",
        micro_batches: int = 4,
        negotiate_shapes: bool = False,
        record: bool = False,
        measure_memory: bool = False,
    ) -> None:
        for c, chunk in enumerate(chunks):
            check_stage(chunk, f"pipeline chunk {c}")
        self.chunks, self.state = chunks, state
        self.p, self.rank, self.v, self.m = state.pp.size, state.pp.rank, len(chunks), micro_batches
        if schedule == "interleaved" and self.v < 2:
            raise GptparConfigError("the interleaved schedule needs v >= 2 model chunks per rank")
        if schedule != "interleaved" and self.v != chunks_per_rank(schedule):
            raise GptparConfigError(
                f"schedule {schedule!r} runs {chunks_per_rank(schedule)} chunk(s) per rank; got {self.v} "
                "(more than one in a loop: 'interleaved')"
            )
        self.schedule, self.style = schedule, placement(schedule)
        self.actions: list[Action] = build(schedule, self.p, micro_batches, self.v)[self.rank]
        self.splits_backward = any(a.kind == "I" for a in self.actions)  # forwards must record deferrable linears
        self.p2p = StageP2P(state.pp, negotiate_shapes)
        self.record = record
        self.measure_memory = measure_memory  # a Python hook per saved tensor: off the hot path by default
        self.nvs = self.p * self.v
        self.tied = list({id(t): t for c in chunks for t in c.tied_parameters()}.values())  # each tensor once
        self.tied_shape = self._agree_tied_shape()
        self.last_stats = StepStats()

    # -- helpers
    def _vs(self, chunk: int) -> int:
        return virtual_stage(self.rank, chunk, self.p, self.style)

    def _rank_of(self, vs: int) -> int:
        return stage_rank(vs, self.p, self.style)

    def _tag(self, mb: int, vs: int, backward: bool) -> int:
        return 2 * (mb * self.nvs + vs) + int(backward)

    def _needs_recv(self, a: Action) -> bool:
        vs = self._vs(a.chunk)
        return (a.kind == "F" and vs > 0) or (a.kind in ("B", "I") and vs < self.nvs - 1)

    def _post(self, a: Action):
        vs = self._vs(a.chunk)
        if a.kind == "F":
            src_vs, tag = vs - 1, self._tag(a.mb, vs - 1, False)
        else:
            src_vs, tag = vs + 1, self._tag(a.mb, vs + 1, True)
        return self.p2p.recv(self._rank_of(src_vs), tag, self.shape, self.dtype, self.state.device)

    def _normalizer(self, targets, normalizer, ignore_index):
        if normalizer is None:  # this batch's valid tokens, over all of its microbatches
            normalizer = (targets != ignore_index).sum().clamp(min=1)
        return torch.as_tensor(normalizer, dtype=torch.float32, device=self.state.device)

    def step(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        loss_scale: float = 1.0,
        normalizer: torch.Tensor | float | None = None,
        ignore_index: int = -100,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward + backward of the batch ``idx, targets [B, s]`` (``B % m == 0``) in ``m`` microbatches.
        The loss is token-weighted: each microbatch contributes the sum of its tokens' losses over
        ``normalizer`` (default: this batch's count of targets other than ``ignore_index``; with data
        parallelism pass the global count, :func:`gptpar.parallel.data.global_token_count`, and reduce
        with ``DataParallel(average=False)``), so uneven masks weigh every token alike. Backward starts from
        that share times ``loss_scale`` (fp16 loss scaling). Returns the (unscaled) loss, the sum of the
        shares, the same on every pp rank. ``doc_ids [B, s]`` (packed documents) reach every stage, split like
        the batch, as ``chunk(..., doc_ids=...)``."""
        mb_idx, mb_tgt = self._split(idx, targets)
        side = self._side(doc_ids)
        norm = self._normalizer(targets, normalizer, ignore_index)
        stats = StepStats()
        store: dict[tuple[int, int], tuple] = {}
        deferred: dict[tuple[int, int], list] = {}
        sent: dict[tuple[int, int], object] = {}  # each stage output's send, released at its backward
        act_bytes: dict[tuple[int, int], int] = {}
        live_bytes = live = 0
        losses = []
        posted: dict[int, object] = {}
        needs = [i for i, a in enumerate(self.actions) if self._needs_recv(a)]
        params = {p.data_ptr() for c in self.chunks for p in c.parameters()} if self.measure_memory else set()
        t_start = time.perf_counter()
        self.p2p.blocked_s = 0.0
        nxt = 0  # index into `needs` of the next receive not yet posted
        for i, a in enumerate(self.actions):
            # Post this action's receive, and the next receive of the schedule, before computing: the next
            # one is then in flight during this compute.
            while nxt < len(needs) and needs[nxt] <= i:
                posted[needs[nxt]] = self._post(self.actions[needs[nxt]])
                nxt += 1
            if nxt < len(needs):
                posted[needs[nxt]] = self._post(self.actions[needs[nxt]])
                nxt += 1
            chunk, vs = self.chunks[a.chunk], self._vs(a.chunk)
            key = (a.mb, a.chunk)
            t0 = time.perf_counter()
            if a.kind == "F":
                if vs == 0:
                    x = mb_idx[a.mb].to(self.state.device)
                else:
                    tw = time.perf_counter()
                    x = posted.pop(i).wait().requires_grad_()
                    if self.record:
                        stats.events.append(("wait", a.mb, a.chunk, tw - t_start, time.perf_counter() - t_start))
                    t0 = time.perf_counter()
                saved = [0]

                def pack(t, saved=saved):
                    if t.data_ptr() not in params:
                        saved[0] += t.numel() * t.element_size()
                    return t

                hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
                with (
                    hooks if self.measure_memory else contextlib.nullcontext(),
                    deferrable_weight_grads() if self.splits_backward else contextlib.nullcontext(),
                ):
                    if vs == self.nvs - 1:
                        tgt = mb_tgt[a.mb].to(self.state.device)
                        # [1]: drop the logits at once (a name would hold them until the next forward)
                        loss = chunk(x, tgt, ignore_index, loss_normalizer=norm, **side(a.mb))[1]
                        losses.append(loss.detach())
                        y, shape = loss * loss_scale, None
                    else:
                        y = chunk(x, **side(a.mb))
                        sent[key] = self.p2p.send(y.detach(), self._rank_of(vs + 1), self._tag(a.mb, vs, False))
                        shape = tuple(y.shape)
                        _release_data(y)  # the send holds the values; backward needs only y's graph
                store[key] = (x, y, shape)
                if self.measure_memory:
                    held = sum(out.untyped_storage().nbytes() for _, out, _ in store.values())
                    stats.peak_output_bytes = max(stats.peak_output_bytes, held)
                act_bytes[key] = saved[0]
                live += 1
                live_bytes += saved[0]
                stats.peak_in_flight = max(stats.peak_in_flight, live)
                stats.peak_activation_bytes = max(stats.peak_activation_bytes, live_bytes)
            elif a.kind in ("B", "I"):
                x, y, shape = store.pop(key)
                if vs == self.nvs - 1:
                    grad = None
                else:
                    tw = time.perf_counter()
                    grad = posted.pop(i).wait()
                    if tuple(grad.shape) != shape:
                        raise RuntimeError(
                            f"pipeline rank {self.rank}: gradient of shape {tuple(grad.shape)} received for stage "
                            f"{vs}'s output of shape {shape} (microbatch {a.mb})"
                        )
                    self.p2p.release(sent.pop(key))  # the next stage answered: the output was delivered
                    if self.record:
                        stats.events.append(("wait", a.mb, a.chunk, tw - t_start, time.perf_counter() - t_start))
                    t0 = time.perf_counter()
                if a.kind == "I":
                    with defer_weight_grads(deferred.setdefault(key, [])):
                        _backward(y, grad)
                else:
                    _backward(y, grad)
                if vs > 0:
                    self.p2p.send(x.grad, self._rank_of(vs - 1), self._tag(a.mb, vs, True))
                if a.kind == "B":
                    live -= 1
                    live_bytes -= act_bytes.pop(key)
            elif a.kind == "W":
                queue = deferred.pop(key)
                while queue:  # popped as run: no name keeps a closure (and the gradient it holds) alive
                    queue.pop(0)()
                live -= 1
                live_bytes -= act_bytes.pop(key)
            if self.record:
                stats.events.append((a.kind, a.mb, a.chunk, t0 - t_start, time.perf_counter() - t_start))
        self.p2p.wait_sends()
        self._sync_tied_grads()
        loss = torch.stack(losses).sum() if losses else torch.zeros((), device=self.state.device)
        comm.broadcast(loss, self.state.pp, src=self._rank_of(self.nvs - 1))
        stats.total_s = time.perf_counter() - t_start
        stats.blocked_s = self.p2p.blocked_s
        self.last_stats = stats
        return loss

    def _split(self, idx: torch.Tensor, targets: torch.Tensor):
        if idx.shape[0] % self.m:
            raise GptparConfigError(f"batch size {idx.shape[0]} is not divisible by micro_batches={self.m}")
        mb_idx, mb_tgt = idx.chunk(self.m), targets.chunk(self.m)
        first_chunk = self.chunks[0]
        self.shape = first_chunk.hidden_shape(mb_idx[0].shape[0], idx.shape[1])
        self.dtype = next(first_chunk.parameters()).dtype
        return mb_idx, mb_tgt

    def _side(self, doc_ids: torch.Tensor | None):
        """Per-microbatch keyword arguments every chunk gets (packed documents' ids), or none."""
        if doc_ids is None:
            return lambda mb: {}
        if doc_ids.shape[0] % self.m:
            raise GptparConfigError(f"doc_ids batch {doc_ids.shape[0]} is not divisible by micro_batches={self.m}")
        parts = [d.to(self.state.device) for d in doc_ids.chunk(self.m)]
        return lambda mb: {"doc_ids": parts[mb]}

    @torch.no_grad()
    def evaluate(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        normalizer=None,
        ignore_index: int = -100,
        doc_ids: torch.Tensor | None = None,
    ):
        """Forward only (no graph kept): the token-weighted loss over the batch, on every pp rank."""
        mb_idx, mb_tgt = self._split(idx, targets)
        side = self._side(doc_ids)
        norm = self._normalizer(targets, normalizer, ignore_index)
        losses = []
        for mb in range(self.m):
            for c, chunk in enumerate(self.chunks):
                vs = self._vs(c)
                x = mb_idx[mb].to(self.state.device) if vs == 0 else self._post(Action("F", mb, c)).wait()
                if vs == self.nvs - 1:
                    tgt = mb_tgt[mb].to(self.state.device)
                    losses.append(chunk(x, tgt, ignore_index, loss_normalizer=norm, **side(mb))[1])
                else:
                    self.p2p.send(chunk(x, **side(mb)), self._rank_of(vs + 1), self._tag(mb, vs, False))
        self.p2p.wait_sends()
        loss = torch.stack(losses).sum() if losses else torch.zeros((), device=self.state.device)
        comm.broadcast(loss, self.state.pp, src=self._rank_of(self.nvs - 1))
        return loss

    def _agree_tied_shape(self) -> tuple[int, ...] | None:
        """The shape of the tensor tied across stages (e.g. an embedding shared with the LM head), agreed
        over pp from the tied tensors themselves; None when no stage has one."""
        shapes = {tuple(t.shape) for t in self.tied}
        if len(shapes) > 1:
            raise GptparConfigError(f"pipeline rank {self.rank}: tied tensors of different shapes {sorted(shapes)}")
        mine = next(iter(shapes), ())
        if len(mine) > 7:
            raise GptparConfigError(f"pipeline rank {self.rank}: a tied tensor of {len(mine)} dims (at most 7)")
        code = torch.zeros(8, dtype=torch.int64, device=self.state.device)
        code[0] = len(mine) + 1 if self.tied else 0
        code[1 : 1 + len(mine)] = torch.tensor(mine, dtype=torch.int64, device=self.state.device)
        agreed = code.clone()
        comm.all_reduce(agreed, self.state.pp, op=comm.ReduceOp.MAX)
        if self.tied and not torch.equal(agreed, code):
            raise GptparConfigError(
                f"pipeline rank {self.rank}: its tied tensor has shape {mine}, another stage's has "
                f"{tuple(agreed[1 : int(agreed[0])].tolist())}"
            )
        return tuple(agreed[1 : int(agreed[0])].tolist()) if agreed[0] else None

    def _sync_tied_grads(self) -> None:
        """Sum the gradients of a tensor tied across stages (e.g. the embedding on the first stage and the
        LM head on the last) over pp, sized from the tied tensors; stages without a copy contribute zeros
        so every pp rank joins the same collective."""
        if self.tied_shape is None:
            return
        buf = torch.zeros(self.tied_shape, dtype=self.dtype, device=self.state.device)
        for t in self.tied:
            if t.grad is not None:
                buf += t.grad
        comm.all_reduce(buf, self.state.pp)
        for t in self.tied:
            if t.grad is None:
                t.grad = buf.clone()
            else:
                t.grad.copy_(buf)  # in place: the gradient may be a view into a data-parallel buffer
