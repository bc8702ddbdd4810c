"""The parallel layout: how the world's ranks are split into tensor, context, data and pipeline groups.

Rank order (documented contract, also what ``init_device_mesh`` builds from the mesh shape below):
``tp`` varies fastest, then ``cp``, then ``dp``, then ``pp``::

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so a tp group is a run of consecutive ranks (one node's GPUs on a cluster, where tp traffic is heaviest),
and pipeline stages are the slowest-varying coordinate (their point-to-point traffic is lightest).

Seeds per coordinate (see :meth:`ParallelState.seed_for`): parameters are initialised from the base seed
alone (identical full weights for every layout); dropout inside the tensor-parallel region draws from
``seed + 2718 + tp_rank`` so each tp rank masks its own heads differently, while everything replicated
across tp draws from the base seed advanced identically on every tp rank.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gptpar.errors import GptparConfigError

logger = logging.getLogger("gptpar")

#: Mesh dimensions from slowest- to fastest-varying.
DIM_ORDER: tuple[str, ...] = ("pp", "dp", "cp", "tp")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of tensor (tp), pipeline (pp), data (dp) and context (cp) parallelism."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for name in DIM_ORDER:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GptparConfigError(f"{name}={value!r} is invalid: every parallel degree must be an integer >= 1")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIM_ORDER)

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} cp={self.cp}"

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, dp: int | None = None) -> ParallelLayout:
        """The layout for ``world_size`` ranks; ``dp`` defaults to whatever the other degrees leave."""
        if dp is None:
            rest = tp * pp * cp
            if rest < 1 or world_size % rest != 0:
                raise GptparConfigError(
                    f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {rest}: "
                    "data parallelism takes the remaining factor, which must be a whole number"
                )
            dp = world_size // rest
        layout = cls(tp=tp, pp=pp, dp=dp, cp=cp)
        layout.check_world_size(world_size)
        return layout

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise GptparConfigError(
                f"world size {world_size} != tp*pp*dp*cp = {self.tp}*{self.pp}*{self.dp}*{self.cp} = {self.world_size}: "
                "the layout must use every rank exactly once"
            )

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of a global rank, e.g. ``{'pp': 0, 'dp': 1, 'cp': 0, 'tp': 1}``."""
        if not 0 <= rank < self.world_size:
            raise GptparConfigError(f"rank {rank} is outside the layout's world of {self.world_size} ranks")
        out = {}
        for name in reversed(DIM_ORDER):
            size = getattr(self, name)
            out[name] = rank % size
            rank //= size
        return {d: out[d] for d in DIM_ORDER}

    def rank_of(self, *, tp: int = 0, pp: int = 0, dp: int = 0, cp: int = 0) -> int:
        """Global rank of a coordinate (inverse of :meth:`coords`)."""
        c = {"tp": tp, "pp": pp, "dp": dp, "cp": cp}
        rank = 0
        for name in DIM_ORDER:
            size = getattr(self, name)
            if not 0 <= c[name] < size:
                raise GptparConfigError(f"{name} coordinate {c[name]} is outside 0..{size - 1}")
            rank = rank * size + c[name]
        return rank

    def group_ranks(self, dim: str, rank: int) -> tuple[int, ...]:
        """The global ranks of ``rank``'s group along ``dim`` (all other coordinates fixed)."""
        if dim not in DIM_ORDER:
            raise GptparConfigError(f"unknown parallel dimension {dim!r}; expected one of {DIM_ORDER}")
        c = self.coords(rank)
        return tuple(self.rank_of(**{**c, dim: i}) for i in range(getattr(self, dim)))

    def ranks_along(self, dims: tuple[str, ...], rank: int) -> tuple[int, ...]:
        """The global ranks that share ``rank``'s coordinates except along ``dims`` (e.g. ``("dp", "cp")``:
        its data x context group), ascending."""
        for dim in dims:
            if dim not in DIM_ORDER:
                raise GptparConfigError(f"unknown parallel dimension {dim!r}; expected one of {DIM_ORDER}")
        c = self.coords(rank)
        sizes = [range(getattr(self, d)) for d in dims]
        return tuple(
            sorted(self.rank_of(**{**c, **dict(zip(dims, idx, strict=True))}) for idx in itertools.product(*sizes))
        )

    def validate_model(self, config: Any) -> None:
        """Check that a model config can be split this way; raises :class:`GptparConfigError` naming the rule.

        ``config`` needs ``n_head``, ``vocab_size``, ``n_layer``, ``seq_len``, ``d_model`` and ``ffn_hidden``.
        """
        problems = []
        if config.n_head % self.tp:
            problems.append(f"n_head={config.n_head} is not divisible by tp={self.tp} (attention is split by heads)")
        n_kv = getattr(config, "n_kv_head", None) or config.n_head
        if n_kv % self.tp and self.tp % n_kv:
            problems.append(
                f"n_kv_head={n_kv} and tp={self.tp}: tp must divide the K/V heads, or be a multiple of them "
                "(each K/V head is then replicated on the tp/n_kv_head ranks whose query heads use it)"
            )
        padded = getattr(config, "padded_vocab", config.vocab_size)
        if padded % self.tp:
            if padded == config.vocab_size:
                problems.append(
                    f"vocab_size={config.vocab_size} is not divisible by tp={self.tp} "
                    "(the embedding and the output layer are split by vocabulary; pad the vocabulary to a multiple "
                    "of tp, e.g. with vocab_multiple)"
                )
            else:
                problems.append(
                    f"vocab_size={config.vocab_size} padded to vocab_multiple={config.vocab_multiple} gives {padded} "
                    f"rows, not divisible by tp={self.tp} (the embedding and the output layer are split by vocabulary)"
                )
        if config.ffn_hidden % self.tp:
            problems.append(
                f"ffn_hidden={config.ffn_hidden} is not divisible by tp={self.tp} (the MLP is split by columns)"
            )
        if config.n_layer < self.pp:
            problems.append(f"n_layer={config.n_layer} is less than pp={self.pp} (every pipeline stage needs a layer)")
        if config.seq_len % self.cp:
            problems.append(
                f"seq_len={config.seq_len} is not divisible by cp={self.cp} (the sequence is split across cp)"
            )
        if problems:
            raise GptparConfigError(f"layout {self} does not fit the model: " + "; ".join(problems))


@dataclass
class Group:
    """One parallel dimension's process group as seen from this rank."""

    name: str
    pg: Any  # torch.distributed.ProcessGroup, or None for a size-1 group with no process group
    ranks: tuple[int, ...]
    rank: int  # this rank's index within the group
    global_rank: int
    timeout: datetime.timedelta = DEFAULT_TIMEOUT

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, ranks={list(self.ranks)}, rank={self.rank})"


@dataclass
class ParallelState:
    """Everything a parallel module needs: the layout, this rank's coordinates, one Group per dimension."""

    layout: ParallelLayout
    rank: int
    device: torch.device
    backend: str
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    groups: dict[str, Group] = field(default_factory=dict)
    seed: int = 1234

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def coords(self) -> dict[str, int]:
        return self.layout.coords(self.rank)

    @property
    def tp(self) -> Group:
        return self.groups["tp"]

    @property
    def pp(self) -> Group:
        return self.groups["pp"]

    @property
    def dp(self) -> Group:
        return self.groups["dp"]

    @property
    def cp(self) -> Group:
        return self.groups["cp"]

    @property
    def world(self) -> Group:
        """Every rank (for decisions that must agree everywhere, e.g. skipping a step on overflow)."""
        return self.groups["world"]

    def tp_subgroup(self, size: int) -> Group:
        """The ``size`` consecutive ranks of this rank's tp group that hold it (e.g. the ranks sharing a K/V
        head when tp > n_kv_head). :func:`init_parallel` creates every such group up front."""
        tp = self.tp
        if size < 1 or tp.size % size:
            raise GptparConfigError(f"a tp subgroup of {size} ranks does not divide the tp group of {tp.size}")
        if size == tp.size:
            return tp
        # tp groups are runs of consecutive ranks
        return self.subgroups(f"tp/{size}", [tuple(range(f, f + size)) for f in range(0, self.world_size, size)])

    def subgroups(self, name: str, rank_lists) -> Group | None:
        """This rank's group among ``rank_lists`` (None if it is in none), known as ``name``. The mesh owns
        every process group: the standard ones are made by :func:`init_parallel`; one made later (e.g. the
        intra-/inter-node groups of a hierarchical reduction) is created here on first use, collectively:
        every rank asks for the same names with the same lists, in the same order."""
        if name not in self.groups:
            mine = None
            for ranks in rank_lists:
                ranks = tuple(ranks)
                pg = dist.new_group(list(ranks), timeout=self.world.timeout) if len(ranks) > 1 else None
                if self.rank in ranks:
                    mine = Group(name, pg, ranks, ranks.index(self.rank), self.rank, self.world.timeout)
            self.groups[name] = mine
        return self.groups[name]

    def reduction_ranks(self) -> list[tuple[int, ...]]:
        """Every gradient-reduction group's ranks: the dp groups, or the dp x cp groups when cp > 1."""
        lay = self.layout
        dims = ("dp", "cp") if lay.cp > 1 else ("dp",)
        return sorted({lay.ranks_along(dims, r) for r in range(lay.world_size)})

    def seed_for(self, purpose: str) -> int:
        """Seeds per coordinate: ``'params'`` (same on all ranks), ``'tp_local'`` (differs across tp only),
        ``'data'`` (differs across dp only)."""
        c = self.coords
        if purpose == "params":
            return self.seed
        if purpose == "tp_local":
            return self.seed + 2718 + c["tp"]
        if purpose == "data":
            return self.seed + 31337 * (c["dp"] + 1)
        raise GptparConfigError(f"unknown seed purpose {purpose!r}; expected 'params', 'tp_local' or 'data'")


_STATE_CACHE: dict[tuple, ParallelState] = {}


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(
    layout: ParallelLayout | None = None,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dp: int | None = None,
    backend: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout: datetime.timedelta | float = DEFAULT_TIMEOUT,
    seed: int = 1234,
) -> ParallelState:
    """Initialise (or join) torch.distributed and build the parallel mesh.

    Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR from the environment), with explicit
    ``rank``/``world_size``/``init_method``, or as a single process (a world of one). If a default process
    group already exists it is reused. ``layout`` may be given whole, or as ``tp``/``pp``/``cp`` with ``dp``
    inferred from the world size. ``timeout`` bounds every gptpar collective (seconds or a timedelta).
    """
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    backend = backend or (dist.get_backend() if dist.is_initialized() else _default_backend())
    if not dist.is_initialized():
        if rank is not None or world_size is not None:
            if rank is None or world_size is None:
                raise GptparConfigError(
                    "pass both rank and world_size (or neither, to read them from torchrun's environment)"
                )
            dist.init_process_group(
                backend, init_method=init_method or "env://", rank=rank, world_size=world_size, timeout=timeout
            )
        elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            # torchrun keeps one store across worker restarts: a restarted round would read the dead
            # round's addresses. Key this round's process-group set-up by the restart count.
            store, r, ws = next(dist.rendezvous("env://", timeout=timeout))
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"gptpar/restart{restart}", store)
            dist.init_process_group(backend, store=store, rank=r, world_size=ws, timeout=timeout)
        else:
            # A world of one: no launcher needed; collectives over size-1 groups are no-ops.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    ws = dist.get_world_size()
    if layout is None:
        layout = ParallelLayout.for_world(ws, tp=tp, pp=pp, cp=cp, dp=dp)
    layout.check_world_size(ws)
    my_rank = dist.get_rank()

    key = (layout, id(dist.distributed_c10d._get_default_group()))
    cached = _STATE_CACHE.get(key)
    if cached is not None:
        for g in cached.groups.values():
            g.timeout = timeout
        cached.seed = seed
        return cached

    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", my_rank % max(torch.cuda.device_count(), 1)))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, layout.mesh_shape, mesh_dim_names=DIM_ORDER)
    expected = layout.coords(my_rank)
    got = dict(zip(DIM_ORDER, mesh.get_coordinate(), strict=True))
    if got != expected:  # our documented rank order must be the mesh's
        raise RuntimeError(f"rank {my_rank}: DeviceMesh coordinates {got} differ from the documented order {expected}")
    groups = {}
    for d in DIM_ORDER:
        ranks = layout.group_ranks(d, my_rank)
        pg = mesh.get_group(d) if len(ranks) > 1 else None
        groups[d] = Group(name=d, pg=pg, ranks=ranks, rank=expected[d], global_rank=my_rank, timeout=timeout)
    groups["world"] = Group(
        name="world",
        pg=dist.group.WORLD if ws > 1 else None,
        ranks=tuple(range(ws)),
        rank=my_rank,
        global_rank=my_rank,
        timeout=timeout,
    )
    state = ParallelState(
        layout=layout, rank=my_rank, device=device, backend=backend, mesh=mesh, groups=groups, seed=seed
    )
    _make_standard_groups(state)
    _STATE_CACHE[key] = state
    if my_rank == 0:
        logger.info("gptpar: initialised %s on %d ranks (%s)", layout, ws, backend)
    return state


def _make_standard_groups(state: ParallelState) -> None:
    """Every process group the library uses besides the mesh's dims, made once here (collectively): tp
    subgroups (K/V heads shared by a few tp ranks), the dp x cp reduction group when cp > 1, and a clone
    of the reduction group for the low-precision all-gather phase (its own group, so it can overlap)."""
    tp = state.layout.tp
    for size in range(2, tp):
        if tp % size == 0:
            state.tp_subgroup(size)
    lists = state.reduction_ranks()
    name = "dp_cp" if state.layout.cp > 1 else "dp"
    if name == "dp_cp":
        state.subgroups("dp_cp", lists)
    if len(lists[0]) > 1:
        state.subgroups(f"{name}_allgather", lists)


def shutdown_parallel() -> None:
    """Leave torch.distributed cleanly: a barrier (nobody tears down connections a peer still uses), then
    destroy every process group. A no-op when not initialised."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _STATE_CACHE.clear()
