"""Nothing lost, nothing hung, nothing let in (issue 20): run identity, non-finite steps, checkpoint
integrity, loopback rendezvous, bounded hangs that name the stuck rank, pruning. Real `gptpar train`
processes on a tiny model."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from test_train import SMALL, losses, train

from gptpar import checkpoint


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def done(tmp_path_factory, cache):
    """A finished 2-process run with checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("done")
    train(out, "--nproc", "2", "--tp", "2", "--save-every", "3", cache=cache, steps=6)
    return out


def test_a_second_run_in_the_same_out_is_refused_unless_resume_or_overwrite(done, tmp_path, cache, refused):
    out = tmp_path / "out"
    shutil.copytree(done, out)
    code, err = refused([*SMALL, "--steps", "6", "--out", out, "--cache-dir", cache, "--nproc", "1"])
    assert code == 2 and "holds a previous run" in err and "--overwrite" in err
    assert len(losses(out)) == 6  # the old log untouched
    train(out, "--nproc", "1", "--overwrite", cache=cache, steps=2)
    assert [r["step"] for r in losses(out)] == [1, 2]
    steps = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("step_"))
    assert steps == ["step_000002"]  # the old run's checkpoints went with it


def test_a_restart_never_resumes_another_runs_checkpoint(done, tmp_path, cache):
    # under an outer torchrun (no gptpar launcher): a new run in an OUT holding another run's checkpoint
    # crashes before its first save and is restarted; it must start over, not continue the other run
    out = tmp_path / "out"
    shutil.copytree(done, out)
    other = checkpoint.read_meta(checkpoint.latest(str(out)))["run_id"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "--max-restarts",
        "1",
        "-m",
        "gptpar.train",
        *SMALL,
        "--steps",
        "4",
        "--eval-every",
        "0",
        "--out",
        str(out),
        "--cache-dir",
        cache,
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "GPTPAR_TEST_KILL_AT_STEP": "2"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / ".killed-once").exists()
    assert [r["step"] for r in losses(out)] == [1, 2, 3, 4]  # from scratch, all four steps trained
    meta = checkpoint.read_meta(checkpoint.latest(str(out)))
    assert meta["step"] == 4 and meta["run_id"] != other


def test_non_finite_steps_are_skipped_then_the_run_stops_and_no_checkpoint_holds_nan(tmp_path, cache):
    out = tmp_path / "out"
    res = train(
        out,
        "--nproc",
        "2",
        "--dp",
        "2",
        "--lr",
        "1e6",
        "--warmup",
        "0",
        "--grad-clip",
        "0",
        "--max-skips",
        "3",
        "--save-every",
        "1",
        cache=cache,
        steps=40,
        check=False,
    )
    assert res.returncode != 0
    assert "consecutive steps had a non-finite loss or gradient norm" in res.stderr, res.stderr[-2000:]
    log = losses(out)
    assert [r["nonfinite"] for r in log[-3:]] == [True, True, True] and all(r["skipped"] for r in log[-3:])
    root = out / "checkpoints"
    for name in os.listdir(root):
        if name.startswith("step_"):
            full = checkpoint.load_full_state_dict(str(root / name))
            assert all(torch.isfinite(t).all() for t in full.values()), name


def _damaged(done, tmp_path, how):
    out = tmp_path / how
    shutil.copytree(done, out)
    folder = out / "checkpoints" / "step_000006"
    shard = folder / "rank_00001.pt"
    if how == "overwritten":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
        shard.write_bytes(bytes(data))
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:1000])
    elif how == "empty":
        shard.write_bytes(b"")
    elif how == "missing":
        shard.unlink()
    elif how == "no-meta":
        (folder / "meta.json").unlink()
    elif how == "dangling":
        (out / "checkpoints" / "latest").write_text("step_000099")
    elif how == "absolute":
        (out / "checkpoints" / "latest").write_text("/etc")
    return out


@pytest.mark.parametrize(
    "how, message",
    [
        ("overwritten", "rank_00001.pt' is corrupt"),
        ("truncated", "rank_00001.pt' is corrupt"),
        ("empty", "rank_00001.pt' is corrupt"),
        ("missing", "rank_00001.pt' is missing"),
        ("no-meta", "missing or incomplete (no meta.json)"),
        ("dangling", "points at 'step_000099'"),
        ("absolute", "holds '/etc', not a checkpoint folder name"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(done, tmp_path, cache, how, message, refused):
    out = _damaged(done, tmp_path, how)
    code, err = refused(
        [*SMALL, "--steps", "8", "--out", out, "--cache-dir", cache, "--nproc", "2", "--tp", "2", "--resume"]
    )
    assert code == 2 and "gptpar train: error: " in err and message in err, err[-2000:]
    assert "Traceback" not in err
    if how == "overwritten":  # the other tools check it too
        res = subprocess.run(
            [sys.executable, "-m", "gptpar.cli", "export", "--ckpt", str(out), "--out", str(tmp_path / "x")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 2 and "is corrupt" in res.stderr
        assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_keep_last_prunes_old_checkpoints(tmp_path, cache):
    train(tmp_path, "--nproc", "1", "--save-every", "1", "--keep-last", "2", cache=cache, steps=5)
    steps = sorted(n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("step_"))
    assert steps == ["step_000004", "step_000005"]
    assert checkpoint.latest(str(tmp_path)).endswith("step_000005")


def _tree(pid):
    """``pid`` and every descendant (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _listening(pids):
    """``(address, port)`` of every TCP socket in LISTEN state owned by ``pids`` (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                addr, port = f[1].split(":")
                found.append((addr, int(port, 16)))
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 (as /proc/net writes them)


def test_every_socket_of_a_single_machine_run_listens_on_loopback(tmp_path, cache):
    cmd = [
        sys.executable,
        "-m",
        "gptpar.train",
        *SMALL,
        "--steps",
        "400",
        "--eval-every",
        "0",
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        cache,
        "--nproc",
        "2",
        "--tp",
        "2",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "log.jsonl").exists() or not losses(tmp_path / "run"):
            assert time.time() < deadline and proc.poll() is None, "the run did not start"
            time.sleep(0.5)
        found = _listening(_tree(proc.pid))
    finally:
        proc.kill()
        proc.wait()
        for p in _tree(proc.pid):
            try:
                os.kill(p, 9)
            except OSError:
                pass
    assert found, "no listening socket seen: the check would prove nothing"
    assert all(addr in LOOPBACK for addr, _ in found), found


def test_a_stopped_rank_fails_the_run_within_the_timeout_naming_it(tmp_path, cache):
    t0 = time.time()
    res = train(
        tmp_path,
        "--nproc",
        "2",
        "--dp",
        "2",
        "--timeout",
        "6",
        cache=cache,
        steps=20,
        check=False,
        env={"GPTPAR_TEST_STOP_AT_STEP": "3"},
    )
    elapsed = time.time() - t0
    assert res.returncode != 0
    assert "did not complete within 6s" in res.stderr and "rank(s) [1] stopped answering" in res.stderr, res.stderr[
        -3000:
    ]
    assert elapsed < 45, elapsed  # was a fixed 600 s, 640 s to exit


def test_export_refuses_an_existing_target(done, tmp_path, capsys):
    from gptpar import cli

    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as exc:  # `gptpar export`, in this process
        cli.main(["export", "--ckpt", str(done), "--out", str(tmp_path / "taken")])
    assert exc.value.code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["taken"] and not os.listdir(tmp_path / "taken")  # nothing left behind
