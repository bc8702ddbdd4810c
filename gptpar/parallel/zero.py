"""ZeRO-1: fp32 master weights and AdamW state sharded across dp.

Works on the buckets of a :class:`~gptpar.parallel.data.DataParallel` built with ``shard_grads=True``:
gradients arrive reduce-scattered (rank r holds the reduced slice r of every bucket), each rank updates
its slices with the fused AdamW op (``gptpar.ops.adamw_step_``), and the new parameters are all-gathered
back into the flat parameter buffer the model's parameters are views of. Optimizer state per rank is
1/dp of the unsharded optimizer's (:meth:`ZeroAdamW.state_bytes`).

What a training loop needs besides ``step`` works on the shards too: :meth:`ZeroAdamW.grad_shards` (e.g.
for the fp16 loss scaler's unscale, or a cp all-reduce), :meth:`ZeroAdamW.clip_grad_norm_` (the global
norm over every parallel dimension, the same rule as :func:`gptpar.precision.clip_grad_norm_`),
``param_groups[0]["lr"]`` for schedules, ``state_dict``/``load_state_dict`` for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptpar.errors import GptparConfigError
from gptpar.ops import adamw_step_
from gptpar.parallel import comm
from gptpar.parallel.data import DataParallel
from gptpar.parallel.mesh import ParallelState


class ZeroAdamW:
    """AdamW over this rank's slices. ``decay(param) -> bool`` picks the parameters weight decay applies to
    (default: all), like torch's two parameter groups of decayed and non-decayed parameters."""

    def __init__(
        self,
        ddp: DataParallel,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        decay: Callable[[torch.nn.Parameter], bool] | None = None,
    ) -> None:
        if not ddp.shard_grads:
            raise GptparConfigError(
                "ZeroAdamW needs DataParallel(..., shard_grads=True): gradients must arrive sharded"
            )
        self.ddp, self.betas, self.eps, self.weight_decay = ddp, betas, eps, weight_decay
        self.param_groups = [{"lr": lr}]  # the one knob schedules turn, as on a torch optimizer
        self.t = 0
        g = ddp.group
        self.slices = []
        self.runs = []  # per slice: (param, start, end, param's offset in the bucket) of each parameter's part
        for b in ddp.buckets:
            n = b.param.numel() // g.size
            lo, hi = g.rank * n, (g.rank + 1) * n
            master = b.param[lo:hi].detach().float().clone()
            self.slices.append((b, slice(lo, hi), master, torch.zeros_like(master), torch.zeros_like(master)))
            runs, off = [], 0
            for prm in b.params:
                s, e = max(off, lo), min(off + prm.numel(), hi)
                if s < e:
                    runs.append((prm, s - lo, e - lo, off))
                off += prm.numel()
            self.runs.append(runs)
        self.decay_runs = [[(s, e) for prm, s, e, _ in runs if decay is None or decay(prm)] for runs in self.runs]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def grad_shards(self) -> list[torch.Tensor]:
        """This rank's reduced gradient slices (fp32), valid between ``ddp.finish()`` and :meth:`step`."""
        shards = [b.shard for b, *_ in self.slices]
        if any(s is None for s in shards):
            raise RuntimeError("ZeroAdamW: no reduced gradient shard; call DataParallel.finish() first")
        return shards

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step on this rank's slices, then all-gather the parameters (call after ``ddp.finish()``)."""
        shards = self.grad_shards()
        self.t += 1
        lr, wd = self.lr, self.weight_decay
        pending = []
        for (b, _sl, master, m, v), grad, runs, decayed in zip(
            self.slices, shards, self.runs, self.decay_runs, strict=True
        ):
            if wd and len(decayed) < len(runs):  # decoupled decay, on the chosen parameters only
                for s, e in decayed:
                    master[s:e].mul_(1.0 - lr * wd)
                step_wd = 0.0
            else:
                step_wd = wd
            adamw_step_(master, grad, m, v, lr=lr, betas=self.betas, eps=self.eps, weight_decay=step_wd, step=self.t)
            pending.append((b, comm.all_gather_async(master.to(b.param.dtype), self.ddp.group)))
            b.shard = None
        for b, work in pending:
            b.param.copy_(work.wait())

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, state: ParallelState, eps: float = 1e-6) -> torch.Tensor:
        """Scale the gradient shards so the global norm is at most ``max_norm``; returns the norm before
        clipping. Each parameter counts once, as in :func:`gptpar.precision.global_grad_norm` (the dp slices
        are disjoint, so their squares add over dp as well)."""
        from gptpar.parallel.grad_norm import norm_span

        sq = torch.zeros((), dtype=torch.float32, device=state.device)
        shards = self.grad_shards()
        for (_, sl, *_), grad, runs in zip(self.slices, shards, self.runs, strict=True):
            for prm, s, e, off in runs:
                # the part of [s, e) (slice coordinates) inside the parameter's counted span
                lo, hi = norm_span(prm, state)
                a, z = max(s, lo + off - sl.start), min(e, hi + off - sl.start)
                if z > a:
                    sq += grad[a:z].pow(2).sum()
        for group in (self.ddp.group, state.tp, state.pp):
            comm.all_reduce(sq, group)
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + eps), max=1.0)
        for grad in shards:
            grad.mul_(coef)
        return norm

    def zero_grad(self) -> None:
        self.ddp.zero_grad()

    @torch.no_grad()
    def reset_from_params(self) -> None:
        """Fresh optimizer state from the current parameters (after loading weights from elsewhere)."""
        self.t = 0
        for b, sl, master, m, v in self.slices:
            master.copy_(b.param[sl])
            m.zero_()
            v.zero_()

    def state_dict(self) -> dict:
        """This rank's slices: master weights, both moments, and the step count (references, as a torch
        optimizer's state_dict: saving it copies nothing extra)."""
        return {"t": self.t, "lr": self.lr, "slices": [list(s[2:]) for s in self.slices]}

    @torch.no_grad()
    def load_state_dict(self, d: dict) -> None:
        if len(d["slices"]) != len(self.slices) or any(
            x.shape != y.shape
            for got, mine in zip(d["slices"], self.slices, strict=True)
            for x, y in zip(got, mine[2:], strict=True)
        ):
            raise GptparConfigError("ZeroAdamW.load_state_dict: the saved slices do not match this layout's buckets")
        self.t = int(d["t"])
        self.param_groups[0]["lr"] = float(d["lr"])
        for got, mine in zip(d["slices"], self.slices, strict=True):
            for x, y in zip(got, mine[2:], strict=True):
                y.copy_(x)

    def param_pieces(self):
        """``(param, start, end, {"master", "exp_avg", "exp_avg_sq"})`` for every part of a parameter this
        rank's slices hold, ``[start, end)`` in the parameter's own flat coordinates (views, no copies):
        optimizer state that a checkpoint can reassemble per parameter and reshard to any layout."""
        for (_, sl, master, m, v), runs in zip(self.slices, self.runs, strict=True):
            for prm, s, e, off in runs:
                start = s + sl.start - off
                yield prm, start, start + (e - s), {"master": master[s:e], "exp_avg": m[s:e], "exp_avg_sq": v[s:e]}

    @torch.no_grad()
    def load_param_state(self, state_of: Callable, step: int) -> None:
        """Fill the slices from per-parameter state: ``state_of(param) -> {"exp_avg", "exp_avg_sq"[,
        "master"]}`` of this rank's (tp-local) parameter, any shape; masters default to the parameters."""
        self.t = int(step)
        for prm, start, end, views in self.param_pieces():
            st = state_of(prm)
            for key, view in views.items():
                src = st.get(key) if key != "master" else st.get("master", prm.detach())
                view.copy_(src.reshape(-1)[start:end])

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of optimizer state on this rank (fp32 master slices and both moments)."""
        return [x for _, _, master, m, v in self.slices for x in (master, m, v)]

    def state_bytes(self) -> int:
        """Bytes of optimizer state on this rank: fp32 master weights and both Adam moments."""
        return sum(x.numel() * x.element_size() for _, _, master, m, v in self.slices for x in (master, m, v))
