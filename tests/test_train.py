"""`gptpar train` end to end: real processes through torchrun's launcher, on the embedded corpus."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from gptpar import checkpoint
from gptpar.models.gpt import GPTConfig
from gptpar.testing import run_distributed

SMALL = [
    "--n-layer",
    "2",
    "--d-model",
    "64",
    "--n-head",
    "4",
    "--seq-len",
    "32",
    "--tokenizer",
    "bytes",
    "--batch-size",
    "8",
    "--micro-batches",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def train(out, *args, cache=None, env=None, check=True, steps=20):
    cmd = [
        sys.executable,
        "-m",
        "gptpar.train",
        *SMALL,
        "--steps",
        str(steps),
        "--eval-every",
        "10",
        "--out",
        str(out),
        *(["--cache-dir", cache] if cache else []),
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("single")
    train(out, "--nproc", "1", cache=cache)
    return out


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("tp2pp2")
    train(out, "--nproc", "4", "--tp", "2", "--pp", "2", "--save-every", "10", cache=cache)
    return out


@pytest.fixture(scope="module")
def zero_dp2cp2(tmp_path_factory, cache):
    """ZeRO-1 sharded over dp x cp (4 processes), checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("zero_dp2cp2")
    train(out, "--nproc", "4", "--dp", "2", "--cp", "2", "--zero", "--save-every", "10", cache=cache)
    return out


def test_single_process_run_learns_and_writes_its_outputs(single):
    log = losses(single)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # the loss visibly falls
    assert "val_loss" in log[9] and "val_loss" in log[19] and log[19]["val_loss"] < 5.0
    for name in ("loss.png", "summary.json"):
        assert os.path.getsize(os.path.join(single, name)) > 0
    summary = json.load(open(os.path.join(single, "summary.json")))
    assert summary["tokens_per_s"] > 0 and len(summary["peak_memory_bytes_per_rank"]) == 1
    # the tensors' peak (tracked over step 2 on CPU), well under the process's RSS, reported beside it
    (peak,), (rss,) = summary["peak_memory_bytes_per_rank"], summary["peak_rss_bytes_per_rank"]
    assert 0 < peak < rss / 4, (peak, rss)


@pytest.mark.parametrize(
    "layout",
    ["tp2pp2", ["--dp", "2", "--tp", "2"], "zero_dp2cp2"],  # names: module fixtures other tests resume from
    ids=["tp2xpp2", "dp2xtp2", "dp2xcp2-zero1"],  # the last: ZeRO-1 sharded over dp x cp
)
def test_four_process_layouts_match_the_single_process_run_step_for_step(single, tmp_path, cache, layout, request):
    if isinstance(layout, str):
        out = request.getfixturevalue(layout)
    else:
        out = tmp_path
        train(out, "--nproc", "4", *layout, cache=cache)
    want, got = losses(single), losses(out)
    assert len(got) == 20
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g["step"], g["loss"], w["loss"])
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5)


def test_packed_documents_train_the_same_at_tp2_x_pp2_as_in_one_process(tmp_path, cache):
    """Document masking on (JSON lines of short documents, each ended by end-of-text, so most windows hold
    several): the same objective at every layout, and a different one from attending across documents."""
    import random

    rng = random.Random(0)
    words = ["def", "x", "return", "import", "class", "self", "for", "in", "if", "else", "print", "(", ")", ":"]
    data = tmp_path / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 12)))}) + "\n" for _ in range(3000))
    )
    runs = {"one": ["--nproc", "1"], "four": ["--nproc", "4", "--tp", "2", "--pp", "2"], "nomask": ["--nproc", "1"]}
    for name, layout in runs.items():
        mask = "--no-doc-mask" if name == "nomask" else "--doc-mask"
        train(tmp_path / name, *layout, "--data", str(data), mask, cache=cache, steps=4)
    want, got, other = (losses(tmp_path / n) for n in runs)
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g["step"], g["loss"], w["loss"])
    assert got[-1]["val_loss"] == pytest.approx(want[-1]["val_loss"], rel=1e-5)
    assert abs(want[0]["loss"] - other[0]["loss"]) > 1e-3  # the masks (and ignored targets) change the loss


def test_fp16_with_loss_scaling_and_zero1_tracks_the_fp32_run(single, tmp_path, cache):
    """fp16 end to end (autocast, dynamic loss scaling, unscale and clipping on ZeRO-1's gradient shards):
    the loss follows the fp32 single-process run to fp16 accuracy. (CPU fp16 matmuls are slow: tiny model.)"""
    train(tmp_path, "--nproc", "2", "--dp", "2", "--zero", "--precision", "fp16", cache=cache)
    want, got = losses(single), losses(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 21))
    assert all(r["loss_scale"] == 2.0**16 and not r["skipped"] for r in got)
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=2e-2), (g["step"], g["loss"], w["loss"])
    assert got[-1]["loss"] < got[0]["loss"] - 1.0


def _reshard(folder, tp):
    from gptpar import ParallelLayout, init_parallel
    from gptpar.models import ParallelGPT, gather_state_dict

    meta = checkpoint.read_meta(folder)
    cfg = GPTConfig.from_dict(meta["model"])
    st = init_parallel(ParallelLayout(tp=tp))
    model = ParallelGPT(cfg, st, seed=4321)  # different init, overwritten by the load
    loaded = checkpoint.load(folder, [model], None, st, cfg.to_dict())
    return loaded["resharded"], gather_state_dict(model, st.tp)


@pytest.mark.parametrize("tp", [1, 4])
def test_checkpoint_reshards_to_another_layout_with_identical_weights(tp2pp2, tp):
    folder = checkpoint.latest(str(tp2pp2))
    assert folder.endswith("step_000020")
    full = checkpoint.load_full_state_dict(folder)
    resharded, sd = run_distributed(_reshard, tp, folder, tp)[0]
    assert resharded is True
    for k, v in full.items():
        assert torch.equal(sd[k], v), k


def test_convert_exports_a_transformers_directory_and_generate_samples(tp2pp2, tmp_path):
    # `convert` is `export`: a directory transformers loads with every weight (it once wrote gptpar's own
    # names, which from_pretrained accepted and then ran with random weights)
    from transformers import AutoModelForCausalLM

    from gptpar.tools import load_reference

    dst = tmp_path / "hf"
    res = subprocess.run(
        [sys.executable, "-m", "gptpar.cli", "convert", "--ckpt", str(tp2pp2), "--out", str(dst)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    hf, info = AutoModelForCausalLM.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ref, _ = load_reference(str(tp2pp2))
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, ref(idx)[0], rtol=1e-5, atol=1e-5)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptpar.cli",
            "generate",
            "--ckpt",
            str(tp2pp2),
            "--prompt",
            "import ",
            "--tokens",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("import ") and len(res.stdout) > len("import ") + 10


def _resumed_half_way(a, b, *opts, cache):
    """Run ``a`` for 6 steps (checkpoints at 3 and 6), then ``b``: a copy of ``a`` rewound to step 3 with
    its log cut there, resumed to step 6 (the same as a run stopped at 3: the checkpoint is the same)."""
    train(a, *opts, "--save-every", "3", cache=cache, steps=6)
    _rewind(a, b, 3, cut_log=True)
    assert [r["step"] for r in losses(b)] == [1, 2, 3]
    train(b, *opts, "--save-every", "3", "--resume", cache=cache, steps=6)
    assert checkpoint.latest(str(b)).endswith("step_000006")  # written again by the resumed run
    return losses(a), losses(b)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, cache):
    # with dropout under tp and sequence parallelism: the tp-local dropout stream (attention, and with SP the
    # sequence-sharded activations) is in the checkpoint beside the default generator
    a, b = tmp_path / "a", tmp_path / "b"
    opts = ["--nproc", "2", "--tp", "2", "--sequence-parallel", "--dropout", "0.2"]
    la, lb = _resumed_half_way(a, b, *opts, cache=cache)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # exactly, step for step
    fa = checkpoint.load_full_state_dict(checkpoint.latest(str(a)))
    fb = checkpoint.load_full_state_dict(checkpoint.latest(str(b)))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    oa = torch.load(os.path.join(checkpoint.latest(str(a)), "rank_00000.pt"), weights_only=True)["optimizer"]
    ob = torch.load(os.path.join(checkpoint.latest(str(b)), "rank_00000.pt"), weights_only=True)["optimizer"]
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])


def test_zero1_resume_is_bitwise_identical(tmp_path, cache):
    # masters and moments from the sharded optimizer state (ZeRO-1 <-> AdamW at other layouts: the
    # resume-at-another-layout tests and test_zero1_state_reshards_to_tensor_parallel_adamw)
    a, b = tmp_path / "a", tmp_path / "b"
    la, lb = _resumed_half_way(a, b, "--nproc", "2", "--dp", "2", "--zero", cache=cache)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # exactly, step for step
    fa = checkpoint.load_full_state_dict(checkpoint.latest(str(a)))
    fb = checkpoint.load_full_state_dict(checkpoint.latest(str(b)))
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


def test_crash_during_save_leaves_the_last_checkpoint_loadable(tmp_path, cache):
    res = train(
        tmp_path,
        "--nproc",
        "2",
        "--tp",
        "2",
        "--save-every",
        "2",
        cache=cache,
        steps=6,
        check=False,
        env={checkpoint.CRASH_ENV: "4"},
    )
    assert res.returncode != 0
    folder = checkpoint.latest(str(tmp_path))
    assert folder.endswith("step_000002")
    assert os.path.exists(str(tmp_path / "checkpoints" / "step_000004.tmp"))  # the torn write, never promoted
    assert checkpoint.read_meta(folder)["step"] == 2
    assert len(checkpoint.load_full_state_dict(folder)) > 0


def test_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(tmp_path, cache):
    res = train(
        tmp_path,
        "--nproc",
        "2",
        "--dp",
        "2",
        "--save-every",
        "2",
        "--max-restarts",
        "1",
        cache=cache,
        steps=6,
        env={"GPTPAR_TEST_KILL_AT_STEP": "3"},
    )
    assert res.returncode == 0
    assert os.path.exists(tmp_path / ".killed-once")  # a worker really died
    assert [r["step"] for r in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]  # resumed from step 2, no gaps or repeats
    assert checkpoint.latest(str(tmp_path)).endswith("step_000006")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/corpus.txt"], "--data '/nonexistent/corpus.txt' does not exist"),
        (["--data", "EMPTY"], "is empty: there is no text to train on"),
        (["--nproc", "2", "--tp", "2", "--n-head", "3", "--d-model", "48"], "n_head=3 is not divisible by tp=2"),
        (["--nproc", "3", "--tp", "2"], "--nproc 3 is not divisible by tp*pp*cp = 2"),
        (["--config", "BADTOML"], "unknown option(s) ['learning_rate']"),
        (["--resume"], "--resume: no checkpoint in"),
        (
            ["--nproc", "2", "--tp", "2", "--zero"],
            "--zero shards the optimizer state across data- and context-parallel ranks: it needs dp*cp > 1, got dp=1 cp=1",
        ),
        (["--micro-batches", "-1"], "--micro-batches=-1 must be >= 1"),
        (["--lr", "-1"], "--lr=-1.0 must be >= 0"),
        (["--eval-batches", "0"], "--eval-batches=0 must be >= 1"),
        (["--virtual-stages", "0"], "--virtual-stages=0 must be >= 1"),
        (["--nproc", "0"], "--nproc=0 must be >= 1"),
        (["--config", "TOML:precision = 'fp64'"], "argument --precision: invalid choice: 'fp64'"),
        (["--config", "TOML:schedule = 'foo'"], "argument --schedule: invalid choice: 'foo'"),
        (["--config", "TOML:tp = = 2"], "is not valid TOML"),
        (["--config", "TOML:resume = 'no'"], "resume = 'no' must be true or false"),
        (["--config", "TOML:tp = 2.5"], "argument --tp: invalid int value: '2.5'"),
        (["--data", "TINY"], "the training split has"),
        (["--data", "SHORTVAL", "--seq-len", "32"], "the validation split has"),
        (["--data", "ODDBIN", "--vocab-size", "256"], "an odd number: not a file of uint16 tokens"),
        (["--doc-mask", "--data", "EVENBIN", "--vocab-size", "256"], "--doc-mask: the data marks no document"),
        (["--out", "UNDERFILE"], "is not writable"),
    ],
)
def test_bad_input_fails_before_any_process_starts(tmp_path, cache, args, message, refused):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 0.1\n")
    (tmp_path / "tiny.txt").write_text("x = 1\n" * 4)  # 24 tokens: fewer than one window
    (tmp_path / "shortval.txt").write_text("a" * 600)  # 600 tokens: the 5% validation split is 30
    (tmp_path / "odd.bin").write_bytes(b"\x01" * 1001)
    (tmp_path / "even.bin").write_bytes(b"\x01\x00" * 1000)
    (tmp_path / "afile").write_text("")

    def sub(a):
        if a.startswith("TOML:"):
            (tmp_path / "run.toml").write_text(a[5:] + "\n")
            return str(tmp_path / "run.toml")
        return {
            "EMPTY": str(empty),
            "BADTOML": str(bad),
            "TINY": str(tmp_path / "tiny.txt"),
            "SHORTVAL": str(tmp_path / "shortval.txt"),
            "ODDBIN": str(tmp_path / "odd.bin"),
            "EVENBIN": str(tmp_path / "even.bin"),
            "UNDERFILE": str(tmp_path / "afile" / "run"),
        }.get(a, a)

    args = [sub(a) for a in args]
    out = tmp_path / "run"
    if "--out" in args:
        out = tmp_path / "afile" / "run"
    code, err = refused([*SMALL, "--steps", "20", "--out", out, "--cache-dir", cache, *args])
    assert code == 2
    assert "gptpar train: error: " in err and message in err, err
    assert "Traceback" not in err
    assert not out.exists()  # nothing written


def test_resume_same_model_continues_and_a_different_model_is_refused(tp2pp2, cache, refused):
    train(tp2pp2, "--nproc", "4", "--tp", "2", "--pp", "2", "--resume", cache=cache, steps=30)
    assert [r["step"] for r in losses(tp2pp2)][-11:] == list(range(20, 31))
    before = sorted(os.listdir(tp2pp2 / "checkpoints"))
    log_before = open(tp2pp2 / "log.jsonl").read()
    argv = [*SMALL[:1], "4", *SMALL[2:], "--steps", "40", "--out", tp2pp2, "--cache-dir", cache]
    code, err = refused([*argv, "--resume", "--nproc", "1"])
    assert code == 2
    assert "gptpar train: error: checkpoint" in err
    assert "was saved for a different model (n_layer: checkpoint 2 vs now 4)" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tp2pp2 / "checkpoints")) == before  # nothing overwritten
    assert open(tp2pp2 / "log.jsonl").read() == log_before


def test_pretokenised_nanogpt_bin_and_a_text_folder(tmp_path, cache):
    import numpy as np

    pattern = np.tile(np.arange(50, dtype=np.uint16), 400)  # a learnable stream of 20,000 tokens
    pattern.tofile(tmp_path / "train.bin")
    train(
        tmp_path / "a",
        "--nproc",
        "1",
        "--data",
        str(tmp_path / "train.bin"),
        "--vocab-size",
        "64",
        cache=cache,
        steps=15,
    )
    log = losses(tmp_path / "a")
    assert log[-1]["loss"] < log[0]["loss"] - 1.0
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (docs / "b.md").write_text("# notes\n" + "pack my box with five dozen liquor jugs. " * 200)
    train(tmp_path / "b", "--nproc", "1", "--data", str(docs), cache=cache, steps=5)
    assert len(losses(tmp_path / "b")) == 5


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, cache):
    """`--model llama-tiny` (RoPE, 4 query / 2 K/V heads, SwiGLU, RMSNorm, untied) alone and at tp2 x pp2."""
    single_out, par_out = tmp_path_factory.mktemp("llama1"), tmp_path_factory.mktemp("llama_tp2pp2")
    train(single_out, "--model", "llama-tiny", "--nproc", "1", cache=cache)
    train(par_out, "--model", "llama-tiny", "--nproc", "4", "--tp", "2", "--pp", "2", "--save-every", "20", cache=cache)
    return single_out, par_out


def test_llama_tiny_trains_at_tp2xpp2_step_for_step_with_the_single_process_run(llama_runs):
    single_out, par_out = llama_runs
    want, got = losses(single_out), losses(par_out)
    assert len(got) == 20 and got[-1]["loss"] < got[0]["loss"] - 1.0  # it learns
    for w, g in zip(want, got, strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g["step"], g["loss"], w["loss"])
    meta = checkpoint.read_meta(checkpoint.latest(str(par_out)))
    assert meta["model"]["position"] == "rope" and meta["model"]["n_kv_head"] == 2


@pytest.mark.parametrize("tp", [1, 4])  # tp=4 > n_kv_head=2: K/V heads replicated on pairs of ranks
def test_llama_checkpoint_reshards_and_generates(llama_runs, tp):
    folder = checkpoint.latest(str(llama_runs[1]))
    full = checkpoint.load_full_state_dict(folder)
    assert full["blocks.0.attn.qkv.weight"].shape[0] == (4 + 2 + 2) * 16
    resharded, sd = run_distributed(_reshard, tp, folder, tp)[0]
    assert resharded is True
    for k, v in full.items():
        assert torch.equal(sd[k], v), k
    if tp == 1:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "gptpar.cli",
                "generate",
                "--ckpt",
                str(llama_runs[1]),
                "--prompt",
                "def ",
                "--tokens",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("def ") and len(res.stdout) > len("def ") + 5


def _rewind(src, dst, step, cut_log=False):
    """A copy of run ``src`` whose latest checkpoint is ``step`` (the later ones removed); ``cut_log``: its
    log too ends at ``step`` (else the resumed run must cut it)."""
    shutil.copytree(src, dst)
    root = os.path.join(dst, "checkpoints")
    for name in os.listdir(root):
        if name.startswith("step_") and int(name[5:]) > step:
            shutil.rmtree(os.path.join(root, name))
    with open(os.path.join(root, "latest"), "w") as f:
        f.write(f"step_{step:06d}")
    if cut_log:
        kept = [r for r in losses(dst) if r["step"] <= step]
        with open(os.path.join(dst, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


@pytest.mark.parametrize(
    "layout",
    [
        ["--nproc", "4", "--dp", "4"],
        ["--nproc", "4", "--tp", "4"],
        ["--nproc", "2", "--pp", "2", "--schedule", "zbv"],
        ["--nproc", "1"],
        ["--nproc", "2", "--dp", "2", "--zero"],
    ],
    ids=["dp4", "tp4", "pp2-zbv", "tp1", "dp2-zero1"],
)
def test_resume_at_another_layout_continues_the_uninterrupted_curve(single, tp2pp2, tmp_path, cache, layout):
    # tp2 x pp2 saved at step 10 with AdamW; the moments and step count move to the new layout with the
    # weights (they used to start fresh: loss +0.7 two steps later)
    run = tmp_path / "run"
    _rewind(tp2pp2, run, 10)
    res = train(run, *layout, "--resume", cache=cache)
    assert "resharded checkpoint" in res.stdout and "weights and optimizer state" in res.stdout
    want, got = losses(single), losses(run)
    assert [r["step"] for r in got] == list(range(1, 21))
    for w, g in zip(want[10:], got[10:], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g["step"], g["loss"], w["loss"])


def test_zero1_state_reshards_to_tensor_parallel_adamw(single, zero_dp2cp2, tmp_path, cache):
    run = tmp_path / "run"
    _rewind(zero_dp2cp2, run, 10)
    # ZeRO-1's slices over dp x cp -> AdamW's tp pieces
    res = train(run, "--nproc", "2", "--tp", "2", "--resume", cache=cache)
    assert "resharded checkpoint" in res.stdout and "weights and optimizer state" in res.stdout
    want, got = losses(single), losses(run)
    for w, g in zip(want[10:], got[10:], strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-5), (g["step"], g["loss"], w["loss"])
