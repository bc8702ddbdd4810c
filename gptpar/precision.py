"""Mixed precision: autocast policy, the dynamic loss scaler, and gradient clipping by the global norm.

* bf16: run forward under :func:`autocast` (weights stay fp32, matmuls run in bf16) — the default on CPU,
  where bf16 matmuls are fast and fp16 ones are not — or keep bf16 parameters with fp32 master weights
  (:class:`gptpar.parallel.zero.ZeroAdamW` keeps fp32 masters).
* fp16: scale the loss (:class:`DynamicLossScaler`), unscale the gradients with a non-finite check in one
  pass (``gptpar.ops.unscale_check_``), skip the step on inf/nan — decided on *every* rank together, via
  an all-reduce MAX over the world — and back off the scale; grow it after a run of good steps.
"""

from __future__ import annotations

import contextlib

import torch

from gptpar.errors import GptparConfigError
from gptpar.ops import unscale_check_
from gptpar.parallel import comm
from gptpar.parallel.grad_norm import clip_grad_norm_, global_grad_norm, norm_span  # noqa: F401  (re-exported)
from gptpar.parallel.mesh import ParallelState

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(precision: str, device_type: str = "cpu"):
    """The forward-pass context for ``precision``: bf16/fp16 autocast, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise GptparConfigError(f"precision={precision!r} is unknown; expected one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class DynamicLossScaler:
    """fp16 loss scaling with growth and back-off; every rank skips the same steps."""

    def __init__(
        self,
        state: ParallelState,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ) -> None:
        if not (growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise GptparConfigError(
                f"loss scaler needs growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1; got "
                f"{growth_factor}, {backoff_factor}, {growth_interval}"
            )
        self.state, self.scale = state, float(init_scale)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.min_scale = min_scale
        self.good_steps = 0
        self.skipped = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, params) -> bool:
        """Divide every gradient by the scale; returns True if any rank saw inf/nan (then skip the step)."""
        return self.unscale_tensors_([p.grad for p in params if p.grad is not None])

    @torch.no_grad()
    def unscale_tensors_(self, grads) -> bool:
        """:meth:`unscale_` on gradient tensors themselves (e.g. ZeRO's sharded gradients)."""
        grads_by_device: dict = {}
        for g in grads:
            grads_by_device.setdefault(g.device, []).append(g)
        found = torch.zeros(1, dtype=torch.float32, device=self.state.device)
        for device, grads in grads_by_device.items():
            dense = [g if g.is_contiguous() else g.contiguous() for g in grads]  # the op wants dense buffers
            flag = unscale_check_(dense, 1.0 / self.scale, torch.zeros(1, dtype=torch.float32, device=device))
            for g, d in zip(grads, dense, strict=True):
                if d is not g:  # unscaled in a copy: write it back
                    g.copy_(d)
            found = torch.maximum(found, flag.to(found.device))
        comm.all_reduce(found, self.state.world, op=comm.ReduceOp.MAX)  # every rank of every group agrees
        return bool(found.item())

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.skipped += 1
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good_steps, self.skipped = float(d["scale"]), int(d["good_steps"]), int(d["skipped"])
