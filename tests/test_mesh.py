"""ParallelLayout: rank order, validation messages, the mesh's groups, and collective timeouts."""

import datetime

import pytest
import torch

from gptpar import CollectiveTimeoutError, GPTConfig, GptparConfigError, ParallelLayout, init_parallel
from gptpar.parallel import comm
from gptpar.testing import run_distributed


def test_rank_order_tp_fastest_then_cp_dp_pp():
    lay = ParallelLayout(tp=2, pp=2, dp=2, cp=2)
    assert lay.world_size == 16
    assert lay.coords(0) == {"pp": 0, "dp": 0, "cp": 0, "tp": 0}
    assert lay.coords(1) == {"pp": 0, "dp": 0, "cp": 0, "tp": 1}
    assert lay.coords(2) == {"pp": 0, "dp": 0, "cp": 1, "tp": 0}
    assert lay.coords(4) == {"pp": 0, "dp": 1, "cp": 0, "tp": 0}
    assert lay.coords(8) == {"pp": 1, "dp": 0, "cp": 0, "tp": 0}
    for r in range(16):
        assert lay.rank_of(**lay.coords(r)) == r
    assert lay.group_ranks("tp", 5) == (4, 5)
    assert lay.group_ranks("cp", 5) == (5, 7)
    assert lay.group_ranks("dp", 5) == (1, 5)
    assert lay.group_ranks("pp", 5) == (5, 13)
    assert lay.ranks_along(("dp", "cp"), 5) == (1, 3, 5, 7)  # the gradient-reduction group under cp
    assert lay.ranks_along(("cp", "dp"), 9) == (9, 11, 13, 15)
    assert lay.ranks_along(("tp",), 5) == lay.group_ranks("tp", 5)


def test_for_world_infers_dp():
    assert ParallelLayout.for_world(8, tp=2, pp=2) == ParallelLayout(tp=2, pp=2, dp=2, cp=1)


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda: ParallelLayout(tp=0), r"tp=0 is invalid: every parallel degree must be an integer >= 1"),
        (lambda: ParallelLayout(pp=1.5), r"pp=1.5 is invalid"),
        (lambda: ParallelLayout(tp=2, dp=2).check_world_size(6), r"world size 6 != tp\*pp\*dp\*cp = 2\*1\*2\*1 = 4"),
        (lambda: ParallelLayout.for_world(6, tp=4), r"world size 6 is not divisible by tp\*pp\*cp = 4\*1\*1 = 4"),
        (
            lambda: ParallelLayout(tp=3).validate_model(GPTConfig(n_head=4, vocab_size=513, d_model=96)),
            r"n_head=4 is not divisible by tp=3 \(attention is split by heads\)",
        ),
        (
            lambda: ParallelLayout(tp=2).validate_model(GPTConfig(vocab_size=511)),
            r"vocab_size=511 is not divisible by tp=2",
        ),
        (
            lambda: ParallelLayout(tp=2).validate_model(GPTConfig(ffn_hidden=301)),
            r"ffn_hidden=301 is not divisible by tp=2",
        ),
        (lambda: ParallelLayout(pp=8).validate_model(GPTConfig(n_layer=4)), r"n_layer=4 is less than pp=8"),
        (lambda: ParallelLayout(cp=3).validate_model(GPTConfig(seq_len=128)), r"seq_len=128 is not divisible by cp=3"),
        (lambda: GPTConfig(d_model=100, n_head=3), r"d_model=100 is not divisible by n_head=3"),
        (lambda: GPTConfig(activation="relu"), r"activation='relu' is unknown"),
        (lambda: GPTConfig(norm="batchnorm"), r"norm='batchnorm' is unknown"),
        (lambda: GPTConfig(n_layer=0), r"n_layer=0 is invalid"),
        (lambda: GPTConfig(dropout=1.0), r"dropout=1.0 is invalid"),
        (lambda: ParallelLayout().coords(3), r"rank 3 is outside the layout's world of 1 ranks"),
    ],
)
def test_validation_messages(make, pattern):
    with pytest.raises(GptparConfigError, match=pattern):
        make()


def test_validate_model_lists_every_problem():
    with pytest.raises(GptparConfigError) as e:
        ParallelLayout(tp=3, pp=8).validate_model(GPTConfig(n_layer=2))
    msg = str(e.value)
    assert "n_head=4 is not divisible by tp=3" in msg and "n_layer=2 is less than pp=8" in msg


def _mesh_groups():
    st = init_parallel(ParallelLayout(tp=2, dp=2))
    out = {d: (g.ranks, g.rank) for d, g in st.groups.items()}
    t = torch.tensor([float(st.rank)])
    comm.all_reduce(t, st.tp)
    out["tp_sum"] = t.item()
    t = torch.tensor([float(st.rank)])
    comm.all_reduce(t, st.dp)
    out["dp_sum"] = t.item()
    return out


def test_mesh_groups_match_documented_order():
    res = run_distributed(_mesh_groups, 4)
    assert res[0]["tp"] == ((0, 1), 0) and res[3]["tp"] == ((2, 3), 1)
    assert res[1]["dp"] == ((1, 3), 0) and res[3]["dp"] == ((1, 3), 1)
    assert res[2]["pp"] == ((2,), 0) and res[2]["cp"] == ((2,), 0)
    assert [r["tp_sum"] for r in res] == [1.0, 1.0, 5.0, 5.0]
    assert [r["dp_sum"] for r in res] == [2.0, 4.0, 2.0, 4.0]


def _world_size_mismatch():
    try:
        init_parallel(ParallelLayout(tp=4))
    except GptparConfigError as e:
        return str(e)
    return None


def test_world_size_mismatch_at_init():
    msgs = run_distributed(_world_size_mismatch, 2)
    assert all(m and "world size 2 != tp*pp*dp*cp = 4*1*1*1 = 4" in m for m in msgs)


def _skip_collective_on_rank_1():
    st = init_parallel(ParallelLayout(tp=2), timeout=datetime.timedelta(seconds=2))
    if st.rank == 1:
        return None
    try:
        comm.all_reduce(torch.ones(3), st.tp)
    except CollectiveTimeoutError as e:
        return str(e)
    return "no timeout"


def test_collective_timeout_names_rank_group_and_op():
    msg = run_distributed(_skip_collective_on_rank_1, 2, fresh=True, timeout=60)[0]
    assert msg.startswith("rank 0: all_reduce on group 'tp' (ranks [0, 1]) did not complete within 2s"), msg
