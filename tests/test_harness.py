"""The multi-process harness itself: results, propagated failures, and timeouts instead of hangs."""

import time

import pytest
import torch
import torch.distributed as dist

from gptpar.testing import DistributedTestError, run_distributed


def _rank_and_sum(x):
    t = torch.tensor([float(dist.get_rank() + x)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _raise_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("boom from rank one")
    return "ok"


def _hang_on_rank_0():
    if dist.get_rank() == 0:
        time.sleep(60)
    return "ok"


def test_results_in_rank_order():
    out = run_distributed(_rank_and_sum, 2, 10)
    assert out == [(0, 21.0), (1, 21.0)]


def test_rank_exception_carries_traceback():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_raise_on_rank_1, 2)
    msg = str(e.value)
    assert "rank 1 raised" in msg and "boom from rank one" in msg and "_raise_on_rank_1" in msg
    assert run_distributed(_rank_and_sum, 2, 0) == [(0, 1.0), (1, 1.0)]  # the pool recovers


def test_hang_fails_instead_of_hanging():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"rank\(s\) \[0\] did not finish within 2s"):
        run_distributed(_hang_on_rank_0, 2, timeout=2)
    assert time.monotonic() - t0 < 20
