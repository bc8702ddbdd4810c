"""RNG for dropout under tensor parallelism.

Regions replicated across tp (residual stream, norms) must draw the *same* dropout masks on every tp
rank; they use the default generator, which every tp rank seeds and advances identically. Regions split
across tp (attention probabilities of the local heads) must draw *different* masks per rank; they run
inside :meth:`TPRngTracker.fork`, which swaps in a generator seeded per tp rank and swaps it back out.
"""

from __future__ import annotations

import contextlib

import torch


class TPRngTracker:
    """A separate RNG stream for the tensor-parallel region, on the device where dropout runs."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seed = seed
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(seed)
            self._state = self._get()

    def _cuda_devices(self) -> list:
        return [self.device] if self.device.type == "cuda" else []

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextlib.contextmanager
    def fork(self):
        """Run the body on this tracker's stream; the default stream is left exactly as it was."""
        outer = self._get()
        self._set(self._state)
        try:
            yield
        finally:
            self._state = self._get()
            self._set(outer)

    def checkpoint_contexts(self):
        """``(forward, recompute)`` context managers for ``torch.utils.checkpoint``'s ``context_fn``: the
        recomputation replays this stream from where the forward found it (so dropout draws the same masks),
        then leaves the stream where it was. (``checkpoint`` itself replays the default generator.)"""
        saved: list[torch.Tensor] = []

        @contextlib.contextmanager
        def forward():
            saved.append(self._state)  # fork() replaces the state tensor, never writes into it
            yield

        @contextlib.contextmanager
        def recompute():
            current, self._state = self._state, saved[0]
            try:
                yield
            finally:
                self._state = current

        return forward(), recompute()
