"""RNG for dropout under tensor parallelism.

Regions replicated across tp (residual stream, norms) must draw the *same* dropout masks on every tp
rank; they use the default generator, which every tp rank seeds and advances identically
(:func:`check_same_default_rng` verifies the seeding once, at model construction). Regions split across
tp, Megatron's rule, must draw *different* masks per rank: attention probabilities of the local heads and,
with sequence parallelism, every activation sharded along the sequence (embedding output, attention and
MLP outputs before the residual add). They run inside :meth:`TPRngTracker.fork`, which swaps in a
generator seeded per tp rank and swaps it back out. Both streams go into checkpoints
(:meth:`TPRngTracker.state_dict`), so a resume with dropout is bitwise.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

from gptpar.errors import GptparConfigError
from gptpar.parallel import comm


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

    def state_dict(self) -> dict:
        return {"seed": self.seed, "state": self._state.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.seed, self._state = sd["seed"], sd["state"].clone()

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


def check_same_default_rng(group, device: torch.device) -> None:
    """Refuse (on every rank alike) if the ranks of ``group`` do not hold the same default generator state:
    replicated activations would then draw different dropout masks and the replicas diverge. Collective:
    one all-reduce of two integers."""
    if group.size == 1:
        return
    state = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()
    h = int.from_bytes(hashlib.sha256(state.cpu().numpy().tobytes()).digest()[:7], "little")
    both = comm.all_reduce(torch.tensor([h, -h], dtype=torch.int64, device=device), group, op=comm.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise GptparConfigError(
            f"the ranks of the {group.name!r} group hold different default RNG states: dropout on replicated "
            "activations would draw different masks and the replicas would diverge. Seed every rank alike "
            "(torch.manual_seed(seed) with the same seed) before building the model"
        )


# ---------------------------------------------------------------------------------------------- drop-in
# For models tensor-parallelised by ``gptpar.parallelize`` (no TPRngTracker of their own): a module whose
# dropout tp splits runs on a generator seeded per call from (one draw of the default CPU generator, tp
# rank). The draw is the same on every rank, so outside the module every rank's default stream stays equal;
# it needs no state of its own, so torch.utils.checkpoint (which restores the default generators) replays
# the same masks on recompute, and a resume that restores the default generator reproduces them.

# The rank-local calls entered, innermost last: [generator, its default-stream state, module, the states
# to go back to after the replicated modules inside].
_REGIONS: list[list] = []
_GOLDEN = 0x9E3779B97F4A7C15


def _generator_of(args: tuple, kwargs: dict) -> torch.Generator:
    """The default generator of the device the call's first tensor lives on (where its dropout draws)."""
    t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if t is not None and t.device.type == "cuda":
        return torch.cuda.default_generators[
            t.device.index if t.device.index is not None else torch.cuda.current_device()
        ]
    return torch.default_generator


def rank_local_forward(module: torch.nn.Module, rank: int) -> None:
    """Make ``module``'s dropout draw different masks on every tp rank (in training; eval draws nothing
    extra). Hooks, the exit one ``always_call``: the generator is put back even when the forward raises, and
    the module's ``forward`` (which transformers wraps for gradient checkpointing) stays its own."""

    def enter(mod, args, kwargs):
        if not mod.training:
            return None
        seed = int(torch.randint(0, 2**62, (1,)))  # the default CPU stream: the same draw on every rank
        gen = _generator_of(args, kwargs)
        _REGIONS.append([gen, gen.get_state(), mod, []])
        gen.manual_seed((seed + (rank + 1) * _GOLDEN) % 2**63)
        return None

    def leave(mod, args, kwargs, out):
        if _REGIONS and _REGIONS[-1][2] is mod:
            gen, state = _REGIONS.pop()[:2]
            gen.set_state(state)
        return None

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave, with_kwargs=True, always_call=True)


def replicated_forward(module: torch.nn.Module) -> None:
    """Inside a :func:`rank_local_forward` call, ``module`` (a dropout on activations every tp rank holds
    alike) draws from the default stream instead, advancing it, so every rank draws the same mask."""

    def enter(mod, args):
        if _REGIONS:
            frame = _REGIONS[-1]
            frame[3].append(frame[0].get_state())  # the rank-local state, back after this module
            frame[0].set_state(frame[1])
        return None

    def leave(mod, args, out):
        if _REGIONS and _REGIONS[-1][3]:
            frame = _REGIONS[-1]
            frame[1] = frame[0].get_state()
            frame[0].set_state(frame[3].pop())
        return None

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
