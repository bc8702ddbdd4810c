"""Pipeline parallelism: schedules as data (checked without processes), balanced partitions, and the
executor across processes against the single-process reference."""

import os

import pytest
import torch
from gpt_helpers import batch, close, merge_pipeline_results, train_pipeline

from gptpar import GPT, GPTConfig, GptparConfigError, ParallelLayout, init_parallel
from gptpar.pipeline import (
    Action,
    PipelineEngine,
    balance,
    build,
    build_stage_chunks,
    partition,
    placement,
    plot_timeline,
    profile_unit_costs,
    simulate,
    simulated_events,
    stage_rank,
    validate,
    virtual_stage,
)
from gptpar.testing import run_distributed


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 4), (3, 7), (8, 16)])
def test_gpipe_and_1f1b_bubble_matches_formula(p, m):
    for name in ("gpipe", "1f1b"):
        acts = build(name, p, m)
        validate(acts, m)
        sim = simulate(acts)  # completes: deadlock-free
        assert sim.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), name
    assert simulate(build("gpipe", p, m)).peak_in_flight == [m] * p
    assert simulate(build("1f1b", p, m)).peak_in_flight == [min(p - r, m) for r in range(p)]


@pytest.mark.parametrize("p, m, v", [(2, 4, 2), (4, 8, 2), (4, 8, 3), (4, 4, 2), (2, 6, 4)])
def test_interleaved_bubble_matches_formula(p, m, v):
    acts = build("interleaved", p, m, v)
    validate(acts, m, v)
    sim = simulate(acts, v)
    assert sim.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12)


@pytest.mark.parametrize("p, m", [(2, 4), (4, 8), (4, 4), (3, 7), (8, 3), (6, 13)])
def test_zero_bubble_is_lower_than_1f1b_with_the_same_memory(p, m):
    acts = build("zb-h1", p, m)
    validate(acts, m)
    zb, ofob = simulate(acts), simulate(build("1f1b", p, m))
    assert zb.bubble_fraction < ofob.bubble_fraction
    assert zb.peak_in_flight == ofob.peak_in_flight
    # the closed form the planner uses: 2(p-1) idle units per rank (F = I = W = 1) beside 3m busy
    assert zb.bubble_fraction == pytest.approx(2 * (p - 1) / (3 * m + 2 * (p - 1)), abs=1e-12)
    assert zb.forward_after_backward == ofob.forward_after_backward
    assert all(a.kind in "FIW" for r in acts for a in r)


@pytest.mark.parametrize("p, m", [(2, 4), (2, 8), (4, 8), (4, 16), (3, 6)])
def test_v_schedules_are_valid_and_beat_1f1b_bubble_within_its_memory(p, m):
    """ZB-V and DualPipeV: two chunks per rank in a V (chunk 0 = stage r, chunk 1 = stage 2p-1-r); at unit
    costs per chunk (half a stage each) ZB-V's bubble is under half of 1F1B's, and a rank holds at most
    2p chunk-microbatches' activations (1F1B's p full-stage ones)."""
    half = {"F": 0.5, "B": 1.0, "I": 0.5, "W": 0.5}
    ofob = simulate(build("1f1b", p, m))
    for name in ("zbv", "dualpipev"):
        acts = build(name, p, m)
        validate(acts, m, 2)
        sim = simulate(acts, 2, half, placement(name))
        assert sim.bubble_fraction <= 0.5 * ofob.bubble_fraction, (name, sim.bubble_fraction, ofob.bubble_fraction)
        assert max(sim.peak_in_flight) <= 2 * p + 1, (name, sim.peak_in_flight)
        assert sim.makespan < ofob.makespan
    assert all(a.kind in "FIW" for r in build("zbv", p, m) for a in r)
    assert [virtual_stage(r, c, p, "v") for r in range(p) for c in (0, 1)] == [
        s for r in range(p) for s in (r, 2 * p - 1 - r)
    ]
    assert all(stage_rank(virtual_stage(r, c, p, "v"), p, "v") == r for r in range(p) for c in (0, 1))


def test_simulator_detects_deadlock_and_invalid_schedules():
    # rank 0 wants B1 (needs rank 1's B1, which needs F1 from rank 0) before it runs F1: deadlock.
    bad = [
        [Action("F", 0), Action("B", 1), Action("F", 1), Action("B", 0)],
        [Action("F", 0), Action("F", 1), Action("B", 1), Action("B", 0)],
    ]
    with pytest.raises(RuntimeError, match="schedule deadlocks"):
        simulate(bad)
    with pytest.raises(AssertionError, match="no forward of microbatch 1"):
        validate([[Action("F", 0), Action("B", 0)]], m=2)
    with pytest.raises(GptparConfigError, match="interleaved schedule needs micro-batches m=6 divisible by pp=4"):
        build("interleaved", 4, 6, 2)
    with pytest.raises(GptparConfigError, match="dualpipev schedule needs micro-batches m=6 >= 2 \\* pp = 8"):
        build("dualpipev", 4, 6)
    with pytest.raises(GptparConfigError, match="schedule 'pipedream' is unknown"):
        build("pipedream", 2, 2)


# ---------------------------------------------------------------------------------------------- partition
def test_balance_is_optimal_and_allows_uneven_splits():
    assert balance([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balance([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]  # uneven unit counts, balanced cost
    assert balance([1, 2, 3, 4, 5], 3) == [(0, 3), (3, 4), (4, 5)]
    with pytest.raises(GptparConfigError, match="cannot split 3 pipeline units into 4 non-empty stages"):
        balance([1, 1, 1], 4)


def test_partition_counts_embedding_and_head_and_reports_shares():
    config = GPTConfig(vocab_size=4096, seq_len=64, n_layer=6, n_head=4, d_model=64)  # heavy vocabulary
    part = partition(config, pp=3)
    # the embedding and the head each cost as much as five blocks: they get stages of their own
    assert part.bounds == ((0, 1), (1, 7), (7, 8))
    assert part.imbalance() < 1.1
    report = part.report()
    assert "stage 1 (rank 1, chunk 0): block.0..block.5 (6 units), 36.2% of cost" in report
    assert sum(part.shares()) == pytest.approx(1.0)
    inter = partition(config, pp=2, v=2)
    assert len(inter.bounds) == 4 and inter.units(1, 1) == inter.bounds[3]
    with pytest.raises(GptparConfigError, match="n_layer=1 is less than pp=2"):
        partition(GPTConfig(n_layer=1), pp=2)


def test_profiled_costs_are_measured_per_unit():
    config = GPTConfig(vocab_size=128, seq_len=32, n_layer=2, n_head=2, d_model=32)
    costs = profile_unit_costs(config, batch=2, reps=2)
    assert len(costs) == 4 and all(c > 0 for c in costs)
    assert len(partition(config, 2, costs=costs).bounds) == 2


# ---------------------------------------------------------------------------------------------- executor
CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=6, n_head=4, d_model=32)
UNTIED = GPTConfig(
    vocab_size=64,
    seq_len=16,
    n_layer=4,
    n_head=4,
    d_model=32,
    tie_embeddings=False,
    activation="swiglu",
    norm="rmsnorm",
)
_REF = {}


def _reference(config, steps, b=4, seq_len=None):
    key = (id(config), steps, b, seq_len)
    if key not in _REF:
        model = GPT(config)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        out = []
        for step in range(steps):
            idx, tgt = batch(config, seed=step, b=b)
            if seq_len is not None:
                idx, tgt = idx[:, :seq_len], tgt[:, :seq_len]
            _, loss = model(idx, tgt)
            loss.backward()
            out.append({"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}})
            opt.step()
            opt.zero_grad(set_to_none=True)
        _REF[key] = (
            out,
            {k: v for k, v in model.state_dict().items() if not (config.tie_embeddings and k == "lm_head.weight")},
        )
    return _REF[key]


def _check(results, config, steps, label, **ref_kw):
    merged, sd = merge_pipeline_results(results, config)
    ref_steps, ref_sd = _reference(config, steps, **ref_kw)
    for s, (got, want) in enumerate(zip(merged, ref_steps, strict=True)):
        close(got["loss"], want["loss"], f"{label} step {s} loss")
        assert got["grads"].keys() == want["grads"].keys(), f"{label}: parameters differ"
        for n in want["grads"]:
            close(got["grads"][n], want["grads"][n], f"{label} step {s} grad {n}")
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the last stage's copy; its gradient was checked against wte's
    assert sd.keys() == ref_sd.keys()
    for n in ref_sd:
        close(sd[n], ref_sd[n], f"{label} weight {n} after {steps} steps")


PIPE_CASES = [
    ("gpipe", 2, 1, CONFIG),
    ("1f1b", 2, 1, UNTIED),
    ("interleaved", 2, 2, CONFIG),
    ("zb-h1", 2, 1, CONFIG),
    ("gpipe", 4, 1, UNTIED),
    ("1f1b", 4, 1, CONFIG),
    ("interleaved", 4, 2, CONFIG),
    ("zb-h1", 4, 1, UNTIED),
]


@pytest.mark.parametrize("schedule, pp, v, config", PIPE_CASES, ids=[f"{s}-pp{p}-v{v}" for s, p, v, _ in PIPE_CASES])
def test_pipeline_matches_reference_over_three_steps(schedule, pp, v, config):
    res = run_distributed(train_pipeline, pp, config, ParallelLayout(pp=pp), 3, schedule, 4, v)
    _check(res, config, 3, f"{schedule} pp={pp} v={v}")


V_CASES = [("zbv", 2, 4, UNTIED), ("dualpipev", 2, 4, CONFIG), ("zbv", 4, 8, CONFIG), ("dualpipev", 4, 8, CONFIG)]


@pytest.mark.parametrize("schedule, pp, m, config", V_CASES, ids=[f"{s}-pp{p}-m{m}" for s, p, m, _ in V_CASES])
def test_v_schedules_match_reference_over_two_steps(schedule, pp, m, config):
    """ZB-V and DualPipeV: the first rank holds the embedding and the head (tied or not), the last rank
    hands its chunk 0's output to its own chunk 1 in memory."""
    res = run_distributed(train_pipeline, pp, config, ParallelLayout(pp=pp), 2, schedule, m, 1, None, m)
    assert f"stage {2 * pp - 1} (rank 0, chunk 1)" in res[0][3] and f"stage {pp} (rank {pp - 1}, chunk 1)" in res[0][3]
    _check(res, config, 2, f"{schedule} pp={pp} m={m}", b=m)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1", "zbv", "dualpipev"])
def test_pipeline_with_tensor_parallel_stages(schedule):
    res = run_distributed(
        train_pipeline, 4, CONFIG, ParallelLayout(tp=2, pp=2), 3, schedule, 4, 1, {"sequence_parallel": True}
    )
    _check(res, CONFIG, 3, f"{schedule} pp=2 x tp=2 (SP)")


def test_negotiated_shapes_handle_a_shorter_sequence():
    # The receivers do not know the sequence length (8, not the configured 16): the shape travels first.
    res = run_distributed(
        train_pipeline, 2, CONFIG, ParallelLayout(pp=2), 2, "1f1b", 4, 1, {"negotiate_shapes": True}, seq_len=8
    )
    _check(res, CONFIG, 2, "negotiated shapes, seq 8", seq_len=8)


def _memory(schedule, m):
    return train_pipeline(CONFIG, ParallelLayout(pp=4), 1, schedule, m, 1, {"measure_memory": True}, batch_size=m)[2]


def test_1f1b_holds_p_microbatches_gpipe_holds_m_measured():
    gp = run_distributed(_memory, 4, "gpipe", 8)
    ofob = run_distributed(_memory, 4, "1f1b", 8)
    for r in range(4):
        assert gp[r].peak_in_flight == 8
        assert ofob[r].peak_in_flight == 4 - r
        ratio = ofob[r].peak_activation_bytes / gp[r].peak_activation_bytes
        assert ratio == pytest.approx((4 - r) / 8, rel=0.05), (r, ratio)
        # sent outputs are released (their graphs kept): GPipe's 8 held outputs weigh 8 x 4 bytes, not
        # 8 x [2, 8, d] activations (the last stage's "outputs" are its scalar losses)
        assert 0 < gp[r].peak_output_bytes <= 8 * 4, (r, gp[r].peak_output_bytes)


def test_sends_release_their_tensors_once_complete_or_answered(monkeypatch):
    from gptpar.parallel import comm
    from gptpar.parallel.pipeline import p2p as p2p_mod

    class Handle:  # a send that completes when the test says so (gloo reports none before its wait)
        def __init__(self):
            self.works, self.finished, self.waited = [object()], False, False

        def done(self):
            return self.finished

        def wait(self):
            self.works, self.waited = [], True

    monkeypatch.setattr(comm, "isend", lambda tensor, group, dst, tag: Handle())
    group = type("G", (), {"rank": 0, "size": 2})()
    p2p = p2p_mod.StageP2P(group)
    a, b = p2p.send(torch.randn(4), 1, 1), p2p.send(torch.randn(4), 1, 2)
    assert len(p2p.pending) == 2
    a.finished = True
    c = p2p.send(torch.randn(4), 1, 3)  # drops the completed send, waited, and its tensor
    assert a.waited and [h for h, _ in p2p.pending] == [b, c]
    p2p.release(c)  # the receiver answered it
    assert c.waited and [h for h, _ in p2p.pending] == [b]
    assert p2p.send(torch.randn(4), 0, 4) is None and 4 in p2p.local  # to itself: a hand-over


def test_timeline_png_and_overlap_measurement(tmp_path):
    res = run_distributed(_timeline_recorded, 2)
    # I really deferred the linears' weight gradients to W (the forwards recorded splittable linears)
    assert all(r[3] > 0 for r in res), [r[3] for r in res]
    events = [r[0] for r in res]
    kinds = {e[0] for ev in events for e in ev}
    assert {"F", "I", "W"} <= kinds and "wait" in kinds
    for _, blocked, total, _ in res:
        assert 0 <= blocked < total
    path = plot_timeline(events, str(tmp_path / "timeline.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000


def test_simulated_v_schedules_draw_on_the_timeline(tmp_path):
    for name in ("zbv", "dualpipev"):
        acts = build(name, 4, 8)
        events = simulated_events(acts, 2, {"F": 0.5, "B": 1.0, "I": 0.5, "W": 0.5}, placement(name))
        assert [len(e) for e in events] == [len(a) for a in acts]
        assert all(t1 > t0 >= 0 for ev in events for _, _, _, t0, t1 in ev)
        path = plot_timeline(events, str(tmp_path / f"{name}.png"), f"{name} simulated", unit="steps")
        assert os.path.getsize(path) > 5000


def _timeline_recorded():
    st = init_parallel(ParallelLayout(pp=2))
    from gptpar.ops import wgrad
    from gptpar.pipeline import make_pipeline

    deferred = [0]
    now_or_later = wgrad.weight_grads_now_or_later

    def spy(params, compute):  # counts weight gradients queued for a W action
        deferred[0] += wgrad.deferred_queue() is not None
        return now_or_later(params, compute)

    wgrad.weight_grads_now_or_later = spy
    engine, _ = make_pipeline(CONFIG, st, "zb-h1", 4, record=True)
    idx, tgt = batch(CONFIG, b=4)
    engine.step(idx, tgt)
    wgrad.weight_grads_now_or_later = now_or_later
    s = engine.last_stats
    return s.events, s.blocked_s, s.total_s, deferred[0]


def _bad_pipeline():
    st = init_parallel(ParallelLayout(pp=2))
    part = partition(CONFIG, 2)
    chunks = build_stage_chunks(CONFIG, st, part)
    errors = []
    try:
        PipelineEngine(chunks, st, "1f1b", 4).step(*batch(CONFIG, b=6))
    except GptparConfigError as e:
        errors.append(str(e))
    try:
        PipelineEngine(chunks, st, "interleaved", 4)
    except GptparConfigError as e:
        errors.append(str(e))
    names = sorted(n for c in chunks for n, _ in c.named_parameters())
    return errors, names


def test_bad_pipeline_configuration_and_stage_only_weights():
    (errors, names0), (_, names1) = run_distributed(_bad_pipeline, 2)
    assert errors == [
        "batch size 6 is not divisible by micro_batches=4",
        "the interleaved schedule needs v >= 2 model chunks per rank",
    ]
    assert "wte.weight" in names0 and "wte.weight" not in names1  # each rank builds only its stage
    assert "ln_f.weight" in names1 and "ln_f.weight" not in names0
    assert not set(names0) & set(n for n in names1 if n != "lm_head.weight")
