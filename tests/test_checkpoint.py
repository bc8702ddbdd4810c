"""gptpar.checkpoint at unit level (one rank): a save/load round trip restores weights and optimizer state
bitwise; the newest complete checkpoint is found; a corrupted file, a bad ``latest`` pointer and non-finite
weights are refused by name; pruning keeps the newest. (Resharding across layouts and crash recovery run
across processes in test_train.py and test_reliability.py.)"""

import os

import pytest
import torch

from gptpar import GPTConfig, GptparConfigError, ParallelGPT, ParallelLayout, init_parallel
from gptpar.errors import GptparError
from gptpar.testing import run_distributed

CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)


def _trained(st, seed=0):
    torch.manual_seed(seed)
    model = ParallelGPT(CONFIG, st)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(idx, idx)[1].backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _round_trip(out):
    from gptpar import checkpoint

    st = init_parallel(ParallelLayout())
    model, opt = _trained(st)
    meta = {"model": CONFIG.to_dict()}
    checkpoint.save(out, 1, [model], opt, st, meta)
    checkpoint.save(out, 2, [model], opt, st, meta)
    folder = checkpoint.latest(out)
    checkpoint.verify(folder)
    fresh, fresh_opt = _trained(st, seed=1)  # different weights and moments
    loaded = checkpoint.load(folder, [fresh], fresh_opt, st, CONFIG.to_dict())
    same_w = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    same_opt = all(torch.equal(s1[k][n], s2[k][n]) for k in s1 for n in ("exp_avg", "exp_avg_sq"))
    checkpoint.prune(out, 1)
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_"))
    return os.path.basename(folder), loaded["step"], same_w, same_opt, kept


def test_save_load_round_trip_latest_and_prune(tmp_path):
    name, step, same_w, same_opt, kept = run_distributed(_round_trip, 1, str(tmp_path))[0]
    assert name == "step_000002" and step == 2
    assert same_w and same_opt
    assert kept == ["step_000002"]


def _refusals(out):
    from gptpar import checkpoint

    st = init_parallel(ParallelLayout())
    model, opt = _trained(st)
    errors = {}
    folder = checkpoint.save(out, 1, [model], opt, st, {"model": CONFIG.to_dict()})
    path = os.path.join(folder, "rank_00000.pt")
    with open(path, "r+b") as f:  # flip one byte in the middle of the file
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    try:
        checkpoint.verify(folder)
    except GptparError as e:
        errors["corrupt"] = str(e)
    with open(os.path.join(out, "checkpoints", "latest"), "w") as f:
        f.write("../elsewhere")
    try:
        checkpoint.latest(out)
    except GptparConfigError as e:
        errors["pointer"] = str(e)
    bad = next(n for n, _ in model.named_parameters() if n.endswith("ln_1.weight"))
    errors["bad_name"] = bad
    with torch.no_grad():
        model.get_parameter(bad)[0] = float("nan")
    try:
        checkpoint.save(out, 2, [model], opt, st, {"model": CONFIG.to_dict()})
    except GptparError as e:
        errors["nan"] = str(e)
    errors["written"] = os.path.exists(os.path.join(out, "checkpoints", "step_000002"))
    return errors


def test_corrupt_files_bad_pointers_and_non_finite_weights_are_refused(tmp_path):
    errors = run_distributed(_refusals, 1, str(tmp_path))[0]
    assert "rank_00000.pt" in errors["corrupt"]
    assert "not a checkpoint folder name" in errors["pointer"]
    assert "non-finite values" in errors["nan"] and errors["bad_name"] in errors["nan"]
    assert errors["written"] is False


@pytest.mark.parametrize("bad", ["step_000009"])
def test_latest_pointing_at_a_missing_folder_is_an_error(tmp_path, bad):
    from gptpar import checkpoint

    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "latest").write_text(bad)
    with pytest.raises(GptparConfigError, match="missing or incomplete"):
        checkpoint.latest(str(tmp_path))
    assert checkpoint.latest(str(tmp_path / "nothing-here")) is None
