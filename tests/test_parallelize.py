"""Drop-in: tensor-parallelise models written without gptpar (Hugging Face GPT-2, a nanoGPT-style model)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptpar import GptparConfigError, ParallelLayout, init_parallel
from gptpar.models.parallel_gpt import gather_full
from gptpar.parallel.tensor import tp_spec
from gptpar.parallelize import Colwise, Replicate, Rowwise, VocabEmbedding, parallelize
from gptpar.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- a nanoGPT
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, 0.0

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn, self.mlp = CausalSelfAttention(n_embd, n_head), MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=64, block_size=16, n_layer=2, n_head=4, n_embd=32):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                h=nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer)),
                ln_f=nn.LayerNorm(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        for n, p in self.named_parameters():
            if n.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, 0, 0.02 if "c_proj" not in n else 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx, targets):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for b in self.transformer.h:
            x = b(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_nanogpt():
    torch.manual_seed(0)
    return NanoGPT()


def make_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        vocab_size=64,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def run_model(model, idx, kind):
    if kind == "hf":
        out = model(input_ids=idx, labels=idx)
        return out.logits, out.loss
    return model(idx, idx)


def _full_params(model, state, grads):
    """Every parameter (or its gradient) at full size, in nn.Linear layout."""
    out = {}
    for n, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        out[n] = gather_full(t, tp_spec(p), state.tp) if state is not None else t.clone()
    return out


def _as_linear_layout(name, t, conv1d_names):
    return t.t() if name in conv1d_names and t.dim() == 2 else t


def _train(kind, tp, steps=3, sequence_parallel=False):
    state = init_parallel(ParallelLayout(tp=tp)) if tp else None
    model = make_hf_gpt2() if kind == "hf" else make_nanogpt()
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    conv1d_w = {f"{n}.weight" for n in conv1d}
    if tp:
        parallelize(model, state, sequence_parallel=sequence_parallel)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    history = []
    for _ in range(steps):
        idx = torch.randint(0, 64, (3, 16), generator=g)
        logits, loss = run_model(model, idx, kind)
        loss.backward()
        grads = (
            _full_params(model, state, grads=True) if tp else {n: p.grad.clone() for n, p in model.named_parameters()}
        )
        if not tp:
            grads = {n: _as_linear_layout(n, v, conv1d_w) for n, v in grads.items()}
        history.append((loss.detach(), logits.detach(), grads))
        opt.step()
        opt.zero_grad()
    weights = (
        _full_params(model, state, grads=False)
        if tp
        else {n: _as_linear_layout(n, p.detach(), conv1d_w) for n, p in model.named_parameters()}
    )
    return history, weights


def _close(got, want, where):
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("kind", ["hf", "nanogpt"])
def test_parallelized_model_matches_original_logits_grads_and_training(kind, sp):
    ref_hist, ref_w = _train(kind, 0)
    for hist, weights in run_distributed(_train, 2, kind, 2, 3, sp):
        for s, ((loss, logits, grads), (r_loss, r_logits, r_grads)) in enumerate(zip(hist, ref_hist, strict=True)):
            _close(loss, r_loss, f"{kind} step {s} loss")
            _close(logits, r_logits, f"{kind} step {s} logits")
            assert grads.keys() == r_grads.keys()
            for n in r_grads:
                _close(grads[n], r_grads[n], f"{kind} step {s} grad {n}")
        for n in ref_w:
            _close(weights[n], ref_w[n], f"{kind} weight {n} after 3 steps")


class WithExtraHead(NanoGPT):
    def __init__(self):
        super().__init__()
        self.value_head = nn.Linear(32, 1)


def _unknown_module():
    state = init_parallel(ParallelLayout(tp=2))
    errors = []
    for model, plan in (
        (WithExtraHead(), None),
        (NanoGPT(), {"transformer.wte": VocabEmbedding(), "nope.*": Replicate()}),
        (nn.Sequential(nn.Linear(4, 4)), None),
        (nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)), {"0": Colwise(), "1": Rowwise()}),
    ):
        try:
            parallelize(model, state, plan)
            errors.append("ok")
        except GptparConfigError as e:
            errors.append(str(e))
    return errors


def test_a_module_the_plan_does_not_know_is_a_clear_error():
    errors = run_distributed(_unknown_module, 2)[0]
    assert "module 'value_head' (Linear) is not covered by the plan" in errors[0]
    assert "plan entries ['nope.*'] match no module of NanoGPT" in errors[1]
    assert "no built-in parallelisation plan for Sequential" in errors[2]
    assert errors[3] == "ok"


def _sequential_user_plan():
    state = init_parallel(ParallelLayout(tp=2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    x = torch.randn(5, 8)
    want = model(x)
    parallelize(model, state, {"0": Colwise(), "2": Rowwise()})
    return (model(x) - want).abs().max().item(), type(model[0]).__name__


def test_user_written_plan_on_a_plain_mlp():
    for err, name in run_distributed(_sequential_user_plan, 2):
        assert err < 1e-6 and name == "ColumnParallelLinear"


def test_pipeline_split_balances_blocks_and_keeps_only_the_stage():
    from gptpar.pipeline import split

    model = make_nanogpt()
    x = torch.randn(2, 16, 32)
    want = x
    for b in model.transformer.h:
        want = b(want)
    stages = split(model, 2, "transformer.h")
    assert [len(s) for s in stages] == [1, 1]
    got = x
    for s in stages:
        for b in s:
            got = b(got)
    torch.testing.assert_close(got, want)
    mine = split(make_nanogpt(), 2, "transformer.h", rank=1)
    assert len(mine) == 1
    with pytest.raises(GptparConfigError, match="cannot split 2 pipeline units into 3"):
        split(make_nanogpt(), 3, "transformer.h")


def _compiled():
    state = init_parallel(ParallelLayout(tp=2))
    model = parallelize(make_nanogpt(), state)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    eager = model(idx, idx)[1]
    eager.backward()
    g_eager = model.lm_head.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")(idx, idx)[1]  # dynamo + AOT autograd, no codegen
    compiled.backward()
    return (compiled - eager).abs().item(), (model.lm_head.weight.grad - g_eager).abs().max().item()


def test_parallelized_model_works_under_torch_compile():
    for dl, dg in run_distributed(_compiled, 2, timeout=600):
        assert dl < 1e-6 and dg < 1e-6


def test_readme_example_runs_under_torchrun(tmp_path):
    import os
    import re
    import subprocess
    import sys

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"<!-- example: parallelize -->\n```python\n(.*?)```", readme, re.S).group(1)
    assert len(code.strip().splitlines()) <= 22
    script = tmp_path / "example.py"
    script.write_text(code)
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step \d loss ([\d.]+)", res.stdout)]
    assert len(losses) == 5 and losses[-1] < losses[0]


def _sp_shapes(kind):
    state = init_parallel(ParallelLayout(tp=2))
    model = parallelize(make_hf_gpt2() if kind == "hf" else make_nanogpt(), state, sequence_parallel=True)
    seen = []
    model.transformer.h[1].ln_2.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    idx = torch.randint(0, 64, (3, 16))
    logits, _ = run_model(model, idx, kind)
    return seen[0], tuple(logits.shape), getattr(model.transformer.h[0].ln_1.weight, "sequence_parallel", False)


@pytest.mark.parametrize("kind", ["hf", "nanogpt"])
def test_sequence_parallel_drop_in_really_shards_the_sequence(kind):
    for resid, logits, marked in run_distributed(_sp_shapes, 2, kind):
        assert resid == (3, 8, 32)  # [batch, seq/tp, hidden] inside the blocks
        assert logits == (3, 16, 64) and marked is True
