"""Point-to-point transfer of activations and gradients between pipeline stages.

Receives are posted early (:meth:`StageP2P.recv` returns at once; :meth:`Recv.wait` blocks) so that they
are in flight while the rank computes; sends are asynchronous, their tensors dropped as they complete (or
once their receiver has answered: :meth:`StageP2P.release`), and the rest waited at the end of the step.
Every message has a tag unique to (microbatch, virtual stage, direction), so messages cannot be matched
to the wrong receive whatever order the schedule posts them in.

A transfer between two stages on the same rank (the bottom of a V placement) is a hand-over in memory.

Shapes: static (both sides compute the shape, nothing extra is sent) or negotiated (the sender first
sends a small shape header; the receiver allocates on arrival) for variable sequence lengths. Works on
gloo and NCCL (on NCCL, tensors live on the rank's GPU). Time blocked in waits is accumulated.
"""

from __future__ import annotations

import time

import torch

from gptpar.parallel import comm
from gptpar.parallel.comm import P2PHandle
from gptpar.parallel.mesh import Group

MAX_DIMS = 4


class Recv:
    def __init__(self, owner: StageP2P, src: int, tag: int, shape, dtype, device) -> None:
        self.owner, self.src, self.tag, self.dtype, self.device = owner, src, tag, dtype, device
        self.header = None
        if owner.negotiate:
            self.header = torch.zeros(MAX_DIMS + 1, dtype=torch.int64, device=device)
            self.handle = owner._irecv(self.header, src, 2 * tag + 1)
            self.buf = None
        else:
            self.buf = torch.empty(shape, dtype=dtype, device=device)
            self.handle = owner._irecv(self.buf, src, 2 * tag)

    def wait(self) -> torch.Tensor:
        t0 = time.perf_counter()
        self.handle.wait()
        if self.header is not None:
            ndim = int(self.header[0])
            shape = [int(x) for x in self.header[1 : 1 + ndim]]
            self.buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.owner._irecv(self.buf, self.src, 2 * self.tag).wait()
        self.owner.blocked_s += time.perf_counter() - t0
        return self.buf


class LocalRecv:
    """A "receive" from this rank itself: the tensor its own earlier send left behind."""

    def __init__(self, owner: StageP2P, tag: int) -> None:
        self.owner, self.tag = owner, tag

    def wait(self) -> torch.Tensor:
        if self.tag not in self.owner.local:
            raise RuntimeError(f"pipeline: a stage on this rank waits for tag {self.tag} it never sent (schedule bug)")
        return self.owner.local.pop(self.tag)


class StageP2P:
    """Sends and receives between the ranks of ``group`` (the pp group); peers are group-local ranks."""

    def __init__(self, group: Group, negotiate_shapes: bool = False) -> None:
        self.group, self.negotiate = group, negotiate_shapes
        self.pending: list[tuple[P2PHandle, torch.Tensor]] = []
        self.local: dict[int, torch.Tensor] = {}  # tag -> tensor sent from this rank to itself
        self.blocked_s = 0.0

    def _irecv(self, buf: torch.Tensor, src: int, tag: int) -> P2PHandle:
        return comm.irecv(buf, self.group, src, tag)

    def recv(self, src: int, tag: int, shape, dtype, device) -> Recv:
        """Post a receive now; ``.wait()`` returns the tensor."""
        if src == self.group.rank:
            return LocalRecv(self, tag)
        return Recv(self, src, tag, shape, dtype, device)

    def send(self, tensor: torch.Tensor, dst: int, tag: int) -> P2PHandle | None:
        """Start sending; returns the handle (None for a hand-over on this rank) for :meth:`release`."""
        if dst == self.group.rank:
            self.local[tag] = tensor
            return None
        tensor = tensor.contiguous()
        if self.negotiate:
            if tensor.dim() > MAX_DIMS:
                raise ValueError(f"negotiated pipeline send supports up to {MAX_DIMS} dims, got {tensor.dim()}")
            header = torch.tensor([tensor.dim(), *tensor.shape] + [0] * (MAX_DIMS - tensor.dim()), device=tensor.device)
            self._isend(header, dst, 2 * tag + 1)
        return self._isend(tensor, dst, 2 * tag)

    def _isend(self, tensor: torch.Tensor, dst: int, tag: int) -> P2PHandle:
        # drop the sends that have completed (waited: an error surfaces here), and the tensors with them: kept
        # to the end of the step, every microbatch's boundary activation and gradient would stay alive.
        # (NCCL reports completion; gloo's sends report it only once waited: see release.)
        for h, _ in self.pending:
            if h.done():
                h.wait()  # returns at once; leaves no works
        self.pending = [(h, t) for h, t in self.pending if h.works]
        handle = comm.isend(tensor, self.group, dst, tag)
        self.pending.append((handle, tensor))
        return handle

    def release(self, handle: P2PHandle | None) -> None:
        """Wait for a send known to be delivered (its receiver has answered it) and drop its tensor."""
        if handle is not None:
            handle.wait()
            self.pending = [(h, t) for h, t in self.pending if h is not handle]

    def wait_sends(self) -> None:
        t0 = time.perf_counter()
        for handle, _ in self.pending:
            handle.wait()
        self.pending.clear()
        self.blocked_s += time.perf_counter() - t0
