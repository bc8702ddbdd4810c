"""ZeRO-1: fp32 master weights and AdamW state sharded across dp.

Works on the buckets of a :class:`~gptpar.parallel.data.DataParallel` built with ``shard_grads=True``:
gradients arrive reduce-scattered (rank r holds the reduced slice r of every bucket), each rank updates
its slices with the fused AdamW op (``gptpar.ops.adamw_step_``), and the new parameters are all-gathered
back into the flat parameter buffer the model's parameters are views of. Optimizer state per rank is
1/dp of the unsharded optimizer's (:meth:`ZeroAdamW.state_bytes`).
"""

from __future__ import annotations

import torch

from gptpar.errors import GptparConfigError
from gptpar.ops import adamw_step_
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel


class ZeroAdamW:
    def __init__(
        self,
        ddp: DataParallel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        if not ddp.shard_grads:
            raise GptparConfigError(
                "ZeroAdamW needs DataParallel(..., shard_grads=True): gradients must arrive sharded"
            )
        self.ddp, self.lr, self.betas, self.eps, self.weight_decay = ddp, lr, betas, eps, weight_decay
        self.t = 0
        g = ddp.group
        self.slices = []
        for b in ddp.buckets:
            n = b.param.numel() // g.size
            sl = slice(g.rank * n, (g.rank + 1) * n)
            master = b.param[sl].detach().float().clone()
            self.slices.append((b, sl, master, torch.zeros_like(master), torch.zeros_like(master)))

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on this rank's slices, then all-gather the parameters (call after ``ddp.finish()``)."""
        self.t += 1
        pending = []
        for b, _sl, master, m, v in self.slices:
            if b.shard is None:
                raise RuntimeError("ZeroAdamW.step() before DataParallel.finish(): no reduced gradient shard")
            adamw_step_(master, b.shard, m, v, lr=self.lr, betas=self.betas, eps=self.eps,
                        weight_decay=self.weight_decay, step=self.t)  # fmt: skip
            pending.append((b, comm.all_gather_async(master.to(b.param.dtype), self.ddp.group)))
            b.shard = None
        for b, work in pending:
            b.param.copy_(work.wait())

    def zero_grad(self) -> None:
        self.ddp.zero_grad()

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 master weights and both Adam moments."""
        return sum(x.numel() * x.element_size() for _, _, master, m, v in self.slices for x in (master, m, v))
