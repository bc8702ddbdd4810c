"""Pipelines of transformers models (GPT-2, Llama with GQA) with no user-written adapter: every schedule,
and tp2 x pp2, against the unsplit model (loss and every parameter's gradient, fp32); plus a non-GPT
stack of blocks through the Stage protocol alone."""

import pytest
import torch
from torch import nn

from gptpar import GptparConfigError, ParallelLayout, init_parallel, parallelize
from gptpar.models.parallel_gpt import gather_full
from gptpar.parallel.tensor import tp_spec
from gptpar.pipeline import SCHEDULES, PipelineEngine, hf_pipeline
from gptpar.testing import run_distributed

TOL = dict(rtol=2e-5, atol=2e-6)


def make(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=4,
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
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg)


def batch(vocab: int, b=4, s=12):
    idx = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(3))
    tgt = torch.full_like(idx, -100)
    tgt[:, :-1] = idx[:, 1:]
    tgt[1, :4] = -100  # uneven masks: the token mean still matches
    return idx, tgt


def reference(kind: str):
    model = make(kind)
    idx, tgt = batch(model.config.vocab_size)
    logits = model(input_ids=idx).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad
        if type(model.get_submodule(n.rpartition(".")[0])).__name__ == "Conv1D" and g.dim() == 2:
            g = g.t()  # nn.Linear layout, as parallelize's layers hold it
        grads[n] = g.clone()
    return loss.detach(), grads


def _pipelined(kinds, tp: int, pp: int, schedules):
    state = init_parallel(ParallelLayout(tp=tp, pp=pp))
    out = {}
    for kind in kinds:
        for sched in schedules:
            model = make(kind)
            if tp > 1:
                parallelize(model, state)
            v = 2 if sched == "interleaved" else 1
            m = 4 if sched == "dualpipev" else 2  # (DualPipeV needs m >= 2 pp)
            engine, part = hf_pipeline(model, state, sched, micro_batches=m, v=v)
            idx, tgt = batch(model.config.vocab_size)
            loss = engine.step(idx, tgt)
            grads = {}
            for n, p in model.named_parameters():
                if p.grad is not None:
                    g = gather_full(p.grad, tp_spec(p), state.tp)
                    conv1d = type(model.get_submodule(n.rpartition(".")[0])).__name__ == "Conv1D"
                    grads[n] = g.t() if conv1d and g.dim() == 2 else g
            out[kind, sched] = (loss, grads, [c.units for c in engine.chunks])
    return out


def _check(results, kinds, schedules):
    for kind in kinds:
        ref_loss, ref_grads = reference(kind)
        for sched in schedules:
            seen = set()
            label = f"{kind} {sched}"
            for res in results:
                loss, grads, _ = res[kind, sched]
                torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda m, label=label: f"{label} loss: {m}")
                for n, g in grads.items():
                    where = f"{label} {n}"
                    torch.testing.assert_close(g, ref_grads[n], **TOL, msg=lambda m, where=where: f"{where}: {m}")
                    seen.add(n)
            assert seen == set(ref_grads), f"{kind} {sched}: no rank holds {set(ref_grads) - seen}"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_transformers_model_pipelined_under_every_schedule_matches_unsplit(kind):
    results = run_distributed(_pipelined, 2, [kind], 1, 2, SCHEDULES)
    _check(results, [kind], SCHEDULES)
    # the stages really are split: each rank holds different units
    assert results[0][kind, "1f1b"][2] != results[1][kind, "1f1b"][2]


def test_transformers_models_tp2_x_pp2_match_unsplit():
    results = run_distributed(_pipelined, 4, ["gpt2", "llama"], 2, 2, ["1f1b"])
    _check(results, ["gpt2", "llama"], ["1f1b"])


# ---------------------------------------------------------------------------------------------- any stack
class Blocks(nn.Module):
    """A stage of a plain stack: embedding on the first, Linear+GELU blocks, a head and loss on the last."""

    def __init__(self, lo: int, hi: int, n: int = 4, d: int = 16, vocab: int = 32):
        super().__init__()
        torch.manual_seed(0)
        full = nn.ModuleList(
            [nn.Embedding(vocab, d)]
            + [nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(n)]
            + [nn.Linear(d, vocab)]
        )
        self.units = nn.ModuleList(full[lo:hi])
        self.first, self.last, self.d = lo == 0, hi == n + 2, d

    def hidden_shape(self, b, s):
        return (b, s, self.d)

    def tied_parameters(self):
        return []

    def forward(self, x, targets=None, ignore_index=-100, *, loss_normalizer=None):
        for u in self.units:
            x = u(x)
        if not self.last:
            return x
        loss = nn.functional.cross_entropy(
            x.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
        )
        return x, loss / loss_normalizer


def _plain_stack():
    state = init_parallel(ParallelLayout(pp=2))
    chunk = Blocks(0, 3) if state.pp.rank == 0 else Blocks(3, 6)
    engine = PipelineEngine([chunk], state, "1f1b", micro_batches=2)
    idx = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    loss = engine.step(idx, idx)
    full = Blocks(0, 6)
    x = idx
    for u in full.units:
        x = u(x)
    ref = nn.functional.cross_entropy(x.flatten(0, 1), idx.flatten())
    ref.backward()
    lo = 0 if state.pp.rank == 0 else 3
    errs = [
        (p.grad - full.units[lo + i].get_parameter(n).grad).abs().max().item()
        for i, u in enumerate(chunk.units)
        for n, p in u.named_parameters()
    ]
    return (loss - ref).abs().item(), max(errs)


def test_a_plain_stack_of_blocks_pipelines_through_the_stage_protocol():
    for dl, dg in run_distributed(_plain_stack, 2):
        assert dl < 1e-6 and dg < 1e-6


def _not_a_stage():
    state = init_parallel(ParallelLayout(pp=2))
    try:
        PipelineEngine([nn.Linear(2, 2)], state)
    except GptparConfigError as e:
        return str(e)


def test_a_chunk_without_the_stage_methods_is_refused_by_name():
    msg = run_distributed(_not_a_stage, 2)[0]
    assert "pipeline chunk 0 (Linear) is not a pipeline Stage" in msg and "hidden_shape" in msg


def test_an_unknown_transformers_model_is_refused_by_name():
    import transformers

    cfg = transformers.GPTNeoXConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=32
    )
    model = transformers.GPTNeoXForCausalLM(cfg)
    from gptpar.models.hf_stages import HFCausalLMStage

    with pytest.raises(GptparConfigError, match="no pipeline stages for GPTNeoXForCausalLM"):
        HFCausalLMStage(model, (0, 1))


def test_unit_costs_come_from_the_model_side_params_or_a_profile():
    from gptpar.pipeline import hf_unit_costs

    model = make("llama")
    by_params = hf_unit_costs(model, "params")
    n = model.config.num_hidden_layers
    assert len(by_params) == n + 2
    assert sum(by_params) == sum(p.numel() for p in model.parameters())  # untied: every parameter once
    profiled = hf_unit_costs(model, "profile", batch=1, seq_len=8)
    assert len(profiled) == n + 2 and all(c > 0 for c in profiled)
    assert all(p.grad is None for p in model.parameters())  # profiling leaves no gradients behind
    with pytest.raises(GptparConfigError, match="cost model 'flops' is unknown"):
        hf_unit_costs(model, "flops")
