"""gptpar's tensor parallelism next to PyTorch's own on the same model, in the same run: ``gptpar.parallelize``
vs ``torch.distributed.tensor.parallel.parallelize_module`` (ColwiseParallel / RowwiseParallel), tp=2, on
a nanoGPT-style model written for neither and on a transformers ``LlamaForCausalLM`` (RoPE, 8 query / 2
K/V heads, SwiGLU, untied head): gptpar's built-in plan (from the model's ``base_model_tp_plan``) vs the
same plan in DTensor. Forward + backward time, bytes sent, peak memory per rank.

    python bench/tensor_parallel.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import peak_memory_of, timed_interleaved
from torch import nn

from gptpar import ParallelLayout, init_parallel, parallelize
from gptpar.parallel import comm
from gptpar.parallelize import Colwise, Replicate, Rowwise
from gptpar.testing import run_distributed


class Attention(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.qkv, self.proj, self.hd = nn.Linear(h, 3 * h), nn.Linear(h, h), h // heads

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, self.hd).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # local heads
        return self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.ln1, self.ln2, self.attn = nn.LayerNorm(h), nn.LayerNorm(h), Attention(h, heads)
        self.fc, self.out = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Model(nn.Module):
    def __init__(self, vocab=2048, h=256, heads=8, layers=4, seq=128):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(h), nn.Linear(h, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten())


def make_llama():
    """A transformers LlamaForCausalLM (random init): RoPE, 8 query / 2 K/V heads, SwiGLU, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    )
    return LlamaForCausalLM(cfg)


class LossOf(nn.Module):
    """``model(idx)`` -> the transformers model's own causal-LM loss on ``idx``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(input_ids=idx, labels=idx).loss


# DTensor's version of the plan gptpar builds from the model's own base_model_tp_plan: vocab-parallel
# embedding, q/k/v/gate/up by output rows (= by heads), o/down by input columns, LM head gathered.
def _dtensor_llama_plan():
    from torch.distributed.tensor import Replicate as DReplicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=DReplicate()),
        "lm_head": ColwiseParallel(output_layouts=DReplicate()),
    }
    for i in range(4):
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{n}"] = ColwiseParallel()
        for n in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{n}"] = RowwiseParallel()
    return plan


def _time_models(models: dict, idx, reps) -> dict:
    """Median forward + backward time of each model (interleaved A B A B ...) and the bytes one step sends
    (gptpar's collectives)."""
    steps, sent = {}, {}
    for name, model in models.items():

        def step(model=model):
            model(idx).backward()
            model.zero_grad(set_to_none=True)

        with comm.count_traffic() as t:
            step()
        steps[name], sent[name] = step, sum(t.values())
    runs = timed_interleaved(steps, reps, barrier=torch.distributed.barrier)
    return {name: {"time_s": statistics.median(runs[name]), "bytes": sent[name]} for name in models}


def _tp_llama(reps, only=None, result=None):
    from torch.distributed.tensor.parallel import parallelize_module

    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(tp=2))
    idx = torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))
    models = {}
    if only in (None, "gptpar"):
        models["gptpar parallelize"] = LossOf(parallelize(make_llama(), st))  # the built-in plan
    if only in (None, "torch"):
        theirs = make_llama()
        parallelize_module(theirs, st.mesh["tp"], _dtensor_llama_plan())
        models["torch parallelize_module"] = LossOf(theirs)
    if only is not None:
        (model,) = models.values()
        return lambda: (model(idx).backward(), model.zero_grad(set_to_none=True))
    la, lb = (m(idx).item() for m in models.values())
    assert abs(la - lb) < 1e-4, f"the two tensor-parallel Llamas disagree: {la} vs {lb}"  # same model, same math
    return _time_models(models, idx, reps)


TP_PLAN = {
    "emb": Replicate(),
    "pos": Replicate(),
    "head": Replicate(),
    "blocks.*.attn.qkv": Colwise(chunks=3),
    "blocks.*.attn.proj": Rowwise(),
    "blocks.*.fc": Colwise(),
    "blocks.*.out": Rowwise(),
}


def _tp(reps, only=None, result=None):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    st = init_parallel(ParallelLayout(tp=2))
    idx = torch.randint(0, 2048, (8, 128), generator=torch.Generator().manual_seed(0))
    if only == "gptpar":
        torch.manual_seed(0)  # the same model on every rank (parallelize's replica check caught it missing)
        model = parallelize(Model(), st, TP_PLAN)
        return lambda: (model(idx).backward(), model.zero_grad(set_to_none=True))
    torch.manual_seed(0)
    ours = parallelize(Model(), st, TP_PLAN)
    torch.manual_seed(0)
    theirs = Model()
    for b in theirs.blocks:
        # torch's ColwiseParallel splits the fused qkv rows contiguously, which would hand rank 0 all of q
        # and half of k; permute the rows to [q_0 k_0 v_0 | q_1 k_1 v_1] first so each rank gets its heads.
        with torch.no_grad():
            for t in (b.attn.qkv.weight, b.attn.qkv.bias):
                parts = [x.chunk(2) for x in t.chunk(3)]
                t.copy_(torch.cat([torch.cat([parts[j][i] for j in range(3)]) for i in range(2)]))
        parallelize_module(
            b,
            st.mesh["tp"],
            {
                "attn.qkv": ColwiseParallel(),
                "attn.proj": RowwiseParallel(),
                "fc": ColwiseParallel(),
                "out": RowwiseParallel(),
            },
        )
    if only == "torch":
        return lambda: (theirs(idx).backward(), theirs.zero_grad(set_to_none=True))
    la, lb = ours(idx).item(), theirs(idx).item()
    assert abs(la - lb) < 1e-4, f"the two tensor-parallel models disagree: {la} vs {lb}"  # same model, same math
    return _time_models({"gptpar parallelize": ours, "torch parallelize_module": theirs}, idx, reps)


def _peak(kind, impl):
    """Peak resident bytes of one implementation, built and stepped twice in a fresh process."""
    torch.set_num_threads(1)
    if kind == "tp_llama":  # load transformers' modules (lazy, ~150 MB) before the baseline: neither side's
        from transformers import LlamaConfig, LlamaForCausalLM

        tiny = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=16,
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        ids = torch.zeros(1, 4, dtype=torch.long)
        tiny(input_ids=ids, labels=ids).loss.backward()
        del tiny
    fn = {"tp": _tp, "tp_llama": _tp_llama}[kind]
    return peak_memory_of(lambda: fn(0, only=impl))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "tensor_parallel_cpu.json"))
    a = ap.parse_args()
    tp = run_distributed(_tp, 2, a.reps, timeout=1200)
    tp_llama = run_distributed(_tp_llama, 2, a.reps, timeout=1200)
    for kind, res in (("tp", tp), ("tp_llama", tp_llama)):
        for name, impl in zip(("gptpar parallelize", "torch parallelize_module"), ("gptpar", "torch"), strict=True):
            peak = max(run_distributed(_peak, 2, kind, impl, fresh=True, timeout=600))
            for r in res:
                r[name]["peak_bytes"] = peak
    date = time.strftime("%Y-%m-%d")
    print(f"tensor parallel side by side, CPU gloo, {os.cpu_count()} cores, {date}, torch {torch.__version__}")
    for title, res in (
        ("4-layer GPT, h=256", tp),
        ("transformers LlamaForCausalLM, 4 layers, h=256, 8 q / 2 K/V heads", tp_llama),
    ):
        print(f"tensor parallel tp=2 ({title}, batch 8 x 128), forward + backward:")
        base = max(r["torch parallelize_module"]["time_s"] for r in res)
        for name in res[0]:
            t = max(r[name]["time_s"] for r in res)
            sent = (
                f"{res[0][name]['bytes'] / 1e6:8.2f} MB sent/rank"
                if res[0][name]["bytes"]
                else "(bytes not counted: DTensor)"
            )
            print(
                f"  {name:26s} {t:7.3f} s  {8 * 128 / t:7.0f} tok/s  {base / t:5.2f}x torch  "
                f"peak {res[0][name]['peak_bytes'] / 1e6:6.1f} MB/rank  {sent}"
            )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"date": date, "tensor_parallel": tp, "tensor_parallel_llama": tp_llama}, f, indent=1)


if __name__ == "__main__":
    main()
