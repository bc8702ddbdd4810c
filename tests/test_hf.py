"""Hugging Face checkpoints in and out (issue 16): random-init transformers models saved with
save_pretrained (no downloads): GPT-2 with its real vocabulary (50257) and a Llama with GQA, an untied head
and Llama 3 RoPE scaling. In: each rank reads its own slices; the first training step's loss equals
transformers' on the same batch at tp2 x pp2, cp2 and dp2 ZeRO-1. Out: `gptpar export` writes a directory
from_pretrained loads with no missing or unexpected keys and the same logits; bf16 stays bf16."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from gptpar import GptparConfigError, ParallelLayout, init_parallel
from gptpar.models.hf import HFWeights, from_hf, read_shard, to_hf  # noqa: F401
from gptpar.testing import run_distributed

transformers = pytest.importorskip("transformers")

SEQ = 64


def _tokenizer(folder, text):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [text],
        trainers.BpeTrainer(vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(os.path.join(folder, "tokenizer.json"))


def _text():
    import textwrap

    src = "".join(open(os.path.join(os.path.dirname(textwrap.__file__), f)).read() for f in ("textwrap.py", "shlex.py"))
    return src


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    text = _text()
    (root / "data.txt").write_text(text)
    torch.manual_seed(0)
    t = transformers
    made = {
        "gpt2": t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=SEQ)),
        "llama": t.LlamaForCausalLM(
            t.LlamaConfig(
                vocab_size=320,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=SEQ,
                tie_word_embeddings=False,
                rope_parameters=dict(
                    rope_type="llama3",
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                    rope_theta=500000.0,
                ),
            )
        ),
    }
    import copy

    made["llama-bf16"] = copy.deepcopy(made["llama"]).to(torch.bfloat16)
    out = {}
    for name, m in made.items():
        folder = root / name
        m.eval().save_pretrained(str(folder))
        _tokenizer(str(folder), text)
        out[name] = str(folder)
    return out, str(root / "data.txt")


def _hf_logits(path, idx):
    m = transformers.AutoModelForCausalLM.from_pretrained(path).eval().float()
    with torch.no_grad():
        return m(idx).logits


# ---------------------------------------------------------------------------------------------- Python API
def _from_hf_logits(path, tp, idx):
    from gptpar.parallel import comm

    st = init_parallel(ParallelLayout(tp=tp))
    model = from_hf(path, st).eval()
    with torch.no_grad():
        logits, _ = model(idx)
    return comm.all_gather(logits, st.tp, dim=-1)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("tp", [1, 2])
def test_from_hf_reproduces_transformers_logits(models, name, tp):
    path = models[0][name]
    idx = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(1))
    want = _hf_logits(path, idx)
    for got in run_distributed(_from_hf_logits, tp, path, tp, idx):
        v = want.shape[-1]
        assert got.shape[-1] == -(-v // 128) * 128  # padded by the model's own rule, not by tp
        assert torch.all(got[..., v:] == float("-inf"))  # padded ids never win
        assert (got[..., :v] - want).abs().max() <= 1e-5 * want.abs().max()


def _round_trip(path, out, tp):
    st = init_parallel(ParallelLayout(tp=tp))
    to_hf(from_hf(path, st), st, out)
    return True


def test_to_hf_writes_a_directory_from_pretrained_loads_whole(models, tmp_path):
    path = models[0]["llama"]
    out = str(tmp_path / "out")
    run_distributed(_round_trip, 2, path, out, 2)
    m, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    idx = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(m.eval()(idx).logits, _hf_logits(path, idx))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


# ---------------------------------------------------------------------------------------------- CLI
def _train(out, *args, steps=2, check=True):
    cmd = [
        sys.executable,
        "-m",
        "gptpar.train",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--eval-every",
        "0",
        "--no-progress",
        "--no-doc-mask",  # compared with transformers' plain forward on the same windows
        "--out",
        str(out),
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _first_batch_loss(path, data, cache, dp, seed=1234):
    """transformers' loss on the global batch of gptpar train's first step (the same windows)."""
    from gptpar.corpus import get_batch, prepare

    corpus = prepare(data, os.path.join(path, "tokenizer.json"), cache_dir=cache)
    xs, ys = zip(*(get_batch(corpus.train, SEQ, 8 // dp, seed, 0, r, dp) for r in range(dp)), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    logits = _hf_logits(path, x)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


@pytest.mark.parametrize(
    "layout",
    [
        ["--nproc", "4", "--tp", "2", "--pp", "2"],
        ["--nproc", "2", "--cp", "2"],
        ["--nproc", "2", "--dp", "2", "--zero"],
    ],
    ids=["tp2xpp2", "cp2", "dp2-zero1"],
)
def test_init_from_first_step_loss_equals_transformers(models, llama_tp2pp2_lr0, tmp_path, layout):
    paths, data = models
    cache = str(tmp_path / "cache")
    for name in ("gpt2", "llama"):
        if name == "gpt2" and layout[1] != "4":
            continue  # GPT-2 (vocab 50257) at tp2 x pp2 only: the slowest to tokenise and to step
        out = tmp_path / name
        if name == "llama" and layout[1] == "4":
            out, cache = llama_tp2pp2_lr0  # (lr 0 changes no first-step loss)
        else:
            _train(out, "--init-from", paths[name], "--data", data, "--cache-dir", cache, *layout)
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        dp = 2 if "--dp" in layout else 1
        want = _first_batch_loss(paths[name], data, cache, dp)
        assert log[0]["loss"] == pytest.approx(want, rel=1e-5), (name, log[0]["loss"], want)


def _lr0_tp2pp2(paths, data, name, out, cache):
    _train(out, "--init-from", paths[name], "--data", data, "--cache-dir", cache, "--lr", "0", "--nproc", "4", "--tp", "2",
           "--pp", "2")  # fmt: skip
    return out, cache


@pytest.fixture(scope="module")
def llama_tp2pp2_lr0(models, tmp_path_factory):
    """(run folder, its cache): two steps from the Llama directory at tp2 x pp2 with lr 0."""
    root = tmp_path_factory.mktemp("llama_tp2pp2_lr0")
    return _lr0_tp2pp2(*models, "llama", root / "run", str(root / "cache"))


@pytest.mark.parametrize("name", ["llama", "llama-bf16"])
def test_train_with_lr_0_then_export_gives_back_the_same_model(models, llama_tp2pp2_lr0, tmp_path, name):
    paths, data = models
    exported = tmp_path / "export"
    if name == "llama":
        out, _ = llama_tp2pp2_lr0
    else:
        out, _ = _lr0_tp2pp2(paths, data, name, tmp_path / "run", str(tmp_path / "c"))
    from gptpar import cli

    cli.main(["export", "--ckpt", str(out), "--out", str(exported)])  # `gptpar export`, in this process
    cfg = json.load(open(exported / "config.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    want_dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    assert cfg["dtype"] == cfg["torch_dtype"] == str(want_dtype).removeprefix("torch.")
    from safetensors.torch import load_file

    got, orig = (
        load_file(str(exported / "model.safetensors")),
        load_file(os.path.join(paths[name], "model.safetensors")),
    )
    assert got.keys() == orig.keys()
    for k in orig:
        assert got[k].dtype == want_dtype and torch.equal(got[k], orig[k]), k  # bitwise: lr 0 changes nothing
    m, info = transformers.AutoModelForCausalLM.from_pretrained(str(exported), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    idx = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m.eval().float()(idx).logits, _hf_logits(paths[name], idx))
    assert (exported / "tokenizer.json").exists()
    if name == "llama":
        # files split at a size limit (5 GB by default) with an index, as transformers writes large models
        from gptpar.checkpoint import export_checkpoint
        from gptpar.tools import _resolve_ckpt

        split = tmp_path / "split"
        export_checkpoint(_resolve_ckpt(str(out)), str(split), max_shard_bytes=60_000)
        files = sorted(f.name for f in split.glob("*.safetensors"))
        assert len(files) > 3 and (split / "model.safetensors.index.json").exists()
        m2 = transformers.AutoModelForCausalLM.from_pretrained(str(split)).eval()
        with torch.no_grad():
            assert torch.equal(m2(idx).logits, _hf_logits(paths[name], idx))
        assert not list(tmp_path.glob("*.tmp"))  # nothing left behind
        # generate tokenises and decodes with the model's own tokenizer (kept in the run's folder)
        res = subprocess.run(
            [sys.executable, "-m", "gptpar.cli", "generate", "--ckpt", str(out), "--prompt", "def ", "--tokens", "10"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0 and res.stdout.startswith("def "), res.stderr[-2000:]
        assert (out / "tokenizer" / "tokenizer.json").exists()


# ---------------------------------------------------------------------------------------------- memory
MEMORY = r"""
import os, resource, sys, torch
from gptpar.models.hf import HFWeights, architecture, config_from_hf, read_shard
from gptpar.models.gpt import GPT

path, tp, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
w = HFWeights(path)
config = config_from_hf(w.config)
from gptpar.models.parallel_gpt import full_param_specs
specs = full_param_specs(config)  # the specs of a tp-sharded model, without building one
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
shard = read_shard(w, config, architecture(w.config), specs, tp, rank)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
held = sum(t.numel() * t.element_size() for t in shard.values())
print(peak - before, held)
"""


# gptpar.from_pretrained at tp=8 in one process (a tp group that is never used for a collective: loading
# needs none): the meta-device model, parallelised, then each parameter read slice by slice.
FROM_PRETRAINED_MEMORY = r"""
import datetime, resource, sys, torch
from gptpar.parallel.mesh import Group, ParallelLayout, ParallelState
import gptpar

path, tp, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = datetime.timedelta(seconds=60)
groups = {"tp": Group("tp", None, tuple(range(tp)), rank, rank, t), "world": Group("world", None, tuple(range(tp)), rank, rank, t)}
state = ParallelState(layout=ParallelLayout(tp=tp), rank=rank, device=torch.device("cpu"), backend="gloo", mesh=None,
                      groups=groups)
import transformers  # its modules (auto classes, the model's code: ~180 MB) load before the baseline

with torch.device("meta"):
    transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))


def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))


open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
before = status("VmRSS:")
model = gptpar.from_pretrained(path, state, check_replicas=False)
peak = status("VmHWM:")
held = sum(p.numel() * p.element_size() for p in model.parameters())
print(peak - before, held)
"""


def test_each_rank_reads_only_its_slices_host_memory_near_its_shard(tmp_path):
    from safetensors.torch import save_file

    t = transformers
    cfg = t.LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    folder = tmp_path / "big"
    folder.mkdir()
    cfg.save_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    sd = {}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in t.LlamaForCausalLM(cfg).state_dict().items()}
    for k, shape in shapes.items():
        sd[k] = torch.randn(shape, generator=g)
    full_bytes = sum(v.numel() * 4 for v in sd.values())
    save_file(sd, str(folder / "model.safetensors"))
    del sd
    res = subprocess.run(
        [sys.executable, "-c", MEMORY, str(folder), "8", "3"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    grew, held = (int(x) for x in res.stdout.split())
    assert full_bytes >= 8 * held * 0.95  # the model is >= 8x one rank's shard (tp=8)
    assert grew <= 1.5 * held + 16 * 2**20, (grew, held, full_bytes)  # its shard plus slack, never the model
    # the drop-in path: gptpar.from_pretrained (transformers model on meta, parallelised, slices read)
    res = subprocess.run(
        [sys.executable, "-c", FROM_PRETRAINED_MEMORY, str(folder), "8", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    grew, held = (int(x) for x in res.stdout.split())
    assert full_bytes >= 8 * held * 0.95
    assert grew <= 1.5 * held + 16 * 2**20, (grew, held, full_bytes)
    assert grew >= 0.5 * held, (grew, held)  # the measurement sees the shard itself


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_directories_are_refused_naming_the_file_or_field(models, tmp_path):
    import shutil

    src = models[0]["llama"]
    with pytest.raises(GptparConfigError, match="config.json' is missing"):
        HFWeights(str(tmp_path))
    bad = tmp_path / "truncated"
    shutil.copytree(src, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(GptparConfigError, match="model.safetensors.*truncated"):
        HFWeights(str(bad))
    for field, value, match in (
        ("architectures", ["BertModel"], "architecture 'BertModel'"),
        ("hidden_act", "gelu", "hidden_act='gelu'"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "'yarn'"),
    ):
        d = tmp_path / field
        shutil.copytree(src, d)
        cfg = json.load(open(d / "config.json"))
        cfg[field] = value
        json.dump(cfg, open(d / "config.json", "w"))
        _refused_before_launch(["--init-from", str(d), "--out", str(tmp_path / "r")], match, models[1])
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(extra / "model.safetensors"))
    sd["model.layers.0.self_attn.sinks"] = torch.zeros(4)
    save_file(sd, str(extra / "model.safetensors"))
    with pytest.raises(GptparConfigError, match="tensors gptpar would not use.*sinks"):
        read_shard(HFWeights(str(extra)), *_llama_specs(src))
    _refused_before_launch(
        ["--init-from", src, "--n-layer", "2", "--out", str(tmp_path / "r")], "--n-layer 2 contradicts", models[1]
    )


def _refused_before_launch(argv, match, data):
    """``gptpar train`` refuses in its launcher, before any worker starts (in-process: no interpreter start-up)."""
    from gptpar.train import main

    err = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(err):
        main([*argv, "--data", data])
    assert e.value.code == 2 and match in err.getvalue(), err.getvalue()


def _llama_specs(path):
    from gptpar.models.hf import architecture, config_from_hf
    from gptpar.models.parallel_gpt import full_param_specs

    w = HFWeights(path)
    config = config_from_hf(w.config)
    return config, architecture(w.config), full_param_specs(config), 1, 0


def _live_specs(config, tp):
    from gptpar.models.hf import param_specs
    from gptpar.models.parallel_gpt import ParallelGPT

    st = init_parallel(ParallelLayout(tp=tp))
    return param_specs(ParallelGPT(config, st), tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_the_spec_table_is_what_parallel_gpt_builds(tp):
    from test_llama import GQA, MQA

    from gptpar.models.parallel_gpt import full_param_specs

    for config in (GQA, MQA):
        assert run_distributed(_live_specs, tp, config, tp)[0] == full_param_specs(config)
