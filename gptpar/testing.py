"""Multi-process test harness: run a function on N gloo processes and get every rank's result back.

``run_distributed(fn, world_size, *args, **kwargs)`` runs ``fn(*args, **kwargs)`` on every rank of a pool
of spawned workers that already share a gloo process group (pools are kept per world size and reused, so
each test pays no process start-up or rendezvous). It returns the per-rank results in rank order. If any
rank raises, the call raises :class:`DistributedTestError` carrying that rank's traceback; if the ranks do
not all finish within ``timeout`` seconds, it raises naming the ranks that hung and kills the pool (the
next call starts a fresh one) instead of hanging the test session.

``fn`` must be importable by the workers (a module-level function); results must be picklable.
"""

from __future__ import annotations

import atexit
import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

#: Grace period for the other ranks after one rank failed (they may be blocked on the failed one).
FAILURE_GRACE_S = 3.0


KILL_AT_STEP = "GPTPAR_TEST_KILL_AT_STEP"  # a worker (rank 1) exits once at this step
STOP_AT_STEP = "GPTPAR_TEST_STOP_AT_STEP"  # rank 1 stops itself (SIGSTOP) at this step: a hung peer
CRASH_IN_SAVE = "GPTPAR_TEST_CRASH_IN_SAVE"  # the last rank dies mid-save of this step's checkpoint


def fault_point(step: int, rank: int, world_size: int, out: str, where: str = "step") -> None:
    """The one place faults are injected, for tests only: driven by the environment variables above, a
    no-op without them. ``where``: ``"step"`` (the top of a training step) or ``"save"`` (a checkpoint's
    rank file written, before the checkpoint is complete)."""
    if where == "save":
        if os.environ.get(CRASH_IN_SAVE) == str(step) and rank == world_size - 1:
            os._exit(17)  # a crash mid-save
        return
    if os.environ.get(KILL_AT_STEP) == str(step) and rank == min(1, world_size - 1):
        marker = os.path.join(out, ".killed-once")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)  # a worker failure; torchrun restarts the workers
    if os.environ.get(STOP_AT_STEP) == str(step) and rank == min(1, world_size - 1):
        import signal

        os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent, as a process hung in a driver call


class DistributedTestError(AssertionError):
    """A rank raised, died, or the ranks did not finish in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _detached(obj: Any) -> Any:
    """Tensors detached (and on CPU) so results cross the process boundary by value."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_detached(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj


def _worker(rank: int, world_size: int, init_method: str, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N workers share 2 cores; oversubscription makes every collective slow
    os.environ.setdefault("GPTPAR_WORKER", "1")
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=300)
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        try:
            # Serialise here, not in the queue's feeder thread, so an unpicklable result is reported too.
            results.put((call_id, rank, True, pickle.dumps(_detached(fn(*args, **kwargs)))))
        except BaseException:  # report everything, including assertion failures, with the traceback
            results.put((call_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """``world_size`` spawned processes joined in one gloo process group, running tasks on request."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_method, self.tasks[r], self.results), daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._calls = 0

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout: float) -> list[Any]:
        self._calls += 1
        call_id = self._calls
        for q in self.tasks:
            q.put((call_id, fn, args, kwargs))
        done: dict[int, Any] = {}
        failed: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        first_failure = None
        while len(done) + len(failed) < self.world_size:
            now = time.monotonic()
            if now > deadline or (first_failure is not None and now > first_failure + FAILURE_GRACE_S):
                break
            try:
                cid, rank, ok, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                for r, p in enumerate(self.procs):
                    if not p.is_alive() and r not in done and r not in failed:
                        failed[r] = f"rank {r} exited with code {p.exitcode} (crashed or killed)"
                        first_failure = first_failure or time.monotonic()
                continue
            if cid != call_id:
                continue
            if ok:
                done[rank] = pickle.loads(payload)
            else:
                failed[rank] = payload
                first_failure = first_failure or time.monotonic()
        if failed or len(done) < self.world_size:
            hung = [r for r in range(self.world_size) if r not in done and r not in failed]
            self.close(kill=True)
            parts = [f"--- rank {r} raised:\n{tb}" for r, tb in sorted(failed.items())]
            if hung:
                why = "after another rank failed" if failed else f"within {timeout:g}s"
                parts.append(f"--- rank(s) {hung} did not finish {why} (hung in a collective?); pool killed")
            raise DistributedTestError(
                f"{getattr(fn, '__name__', fn)} on {self.world_size} ranks failed:\n" + "\n".join(parts)
            )
        return [done[r] for r in range(self.world_size)]

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if _POOLS.get(self.world_size) is self:
            del _POOLS[self.world_size]


_POOLS: dict[int, WorkerPool] = {}


def run_distributed(
    fn: Callable, world_size: int, *args, timeout: float = 180.0, fresh: bool = False, **kwargs
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the results in rank order.

    ``fresh=True`` uses a throw-away pool (for tests that leave process groups unusable, e.g. timeouts).
    """
    if fresh:
        pool = WorkerPool(world_size)
        try:
            return pool.run(fn, args, kwargs, timeout)
        finally:
            pool.close(kill=not pool.alive())
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.close(kill=True)
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool.run(fn, args, kwargs, timeout)


def shutdown_pools() -> None:
    """End every pool's processes. Killed, not asked to leave: at the end nothing is waiting for them, and
    an orderly exit (each rank tearing its process group down with the others) took seconds per pool."""
    for pool in list(_POOLS.values()):
        pool.close(kill=True)


atexit.register(shutdown_pools)
