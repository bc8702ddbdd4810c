"""Drop-in tensor parallelism for a model you already have: ``gptpar.parallelize(model, state, plan)``.

Walks ``model`` and replaces, in place, each module the plan names with its tensor-parallel version,
sharding the existing weights, so the parallel model computes what the original did. A plan maps
module-name patterns (``fnmatch``: ``transformer.h.*.attn.c_attn``) to styles:

* :class:`Colwise` — a ``nn.Linear`` or HF ``Conv1D`` split by output features (``chunks``: fused blocks,
  e.g. 3 for q|k|v; ``gather_output``: all-gather the result, e.g. an LM head feeding a stock loss);
* :class:`Rowwise` — split by input features, output all-reduced;
* :class:`VocabEmbedding` — an ``nn.Embedding`` split by rows;
* :class:`Replicate` — keep as is (every rank holds it whole);
* :class:`Heads` — divide a module's head-count attributes by tp (HF attention reads them);
* any callable ``(module, name, state) -> module`` for anything else.

Every ``nn.Linear``, ``nn.Embedding`` and ``Conv1D`` must be covered (``Replicate`` is explicit), so a
module the plan does not know is an error naming it, not a silently unsharded layer. Built-in plans:
Hugging Face ``GPT2LMHeadModel`` and nanoGPT's layout (``transformer.h[i].attn.c_attn`` ...).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptpar.errors import GptparConfigError
from gptpar.parallel.mesh import ParallelLayout, ParallelState, init_parallel
from gptpar.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, load_full_


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _linear_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """Weight as ``[out, in]`` (nn.Linear's layout), bias, in, out — for nn.Linear or HF Conv1D."""
    if isinstance(m, nn.Linear):
        return m.weight.detach(), (m.bias.detach() if m.bias is not None else None), m.in_features, m.out_features
    if _is_conv1d(m):  # y = x @ W + b with W [in, out]
        w = m.weight.detach()
        return w.t(), (m.bias.detach() if m.bias is not None else None), w.shape[0], w.shape[1]
    raise GptparConfigError(f"expected nn.Linear or Conv1D, got {type(m).__name__}")


@dataclass(frozen=True)
class Colwise:
    chunks: int = 1
    gather_output: bool = False
    sequence_parallel: bool = False  # input is sequence-sharded along seq_dim: all-gather it first
    seq_dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        w, b, fin, fout = _linear_params(m)
        new = ColumnParallelLinear(fin, fout, b is not None, group=state.tp, gather_output=self.gather_output,
                                   chunks=self.chunks, sequence_parallel=self.sequence_parallel,
                                   seq_dim=self.seq_dim, device=w.device, dtype=w.dtype)  # fmt: skip
        load_full_(new.weight, w, state.tp)
        if b is not None:
            load_full_(new.bias, b, state.tp)
        return new


@dataclass(frozen=True)
class Rowwise:
    sequence_parallel: bool = False  # reduce-scatter the output along seq_dim instead of all-reducing it
    seq_dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        w, b, fin, fout = _linear_params(m)
        new = RowParallelLinear(fin, fout, b is not None, group=state.tp, sequence_parallel=self.sequence_parallel,
                                seq_dim=self.seq_dim, device=w.device, dtype=w.dtype)  # fmt: skip
        load_full_(new.weight, w, state.tp)
        if b is not None:
            with torch.no_grad():
                new.bias.copy_(b)
        return new


@dataclass(frozen=True)
class VocabEmbedding:
    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        if not isinstance(m, nn.Embedding):
            raise GptparConfigError(f"VocabEmbedding for {name!r}: expected nn.Embedding, got {type(m).__name__}")
        new = VocabParallelEmbedding(m.num_embeddings, m.embedding_dim, group=state.tp, device=m.weight.device,
                                     dtype=m.weight.dtype)  # fmt: skip
        load_full_(new.weight, m.weight.detach(), state.tp)
        return new


@dataclass(frozen=True)
class Replicate:
    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        return m


@dataclass(frozen=True)
class Heads:
    """Divide integer attributes (head counts, split sizes) by tp, checking divisibility."""

    attrs: tuple[str, ...]

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        for a in self.attrs:
            v = getattr(m, a)
            if v % state.tp.size:
                raise GptparConfigError(f"{name}.{a}={v} is not divisible by tp={state.tp.size}")
            setattr(m, a, v // state.tp.size)
        return m


@dataclass(frozen=True)
class SequenceParallelEnter:
    """Enter the sequence-parallel region at this module's input: keep this rank's ``1/tp`` of the
    sequence (dimension ``dim``); the gradient is all-gathered on the way back."""

    dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        from gptpar.parallel import comm

        def pre(module, args, kwargs):
            if args:
                return (comm.scatter_to_region(args[0], state.tp, self.dim), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: comm.scatter_to_region(kwargs[key], state.tp, self.dim)}

        m.register_forward_pre_hook(pre, with_kwargs=True)
        return m


@dataclass(frozen=True)
class SequenceParallelExit:
    """Leave the sequence-parallel region at this module's output (all-gather along ``dim``); the module
    itself (a norm) runs on the sequence shard, so its parameters' gradients are all-reduced over tp."""

    dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        from gptpar.parallel import comm

        SequenceParallelNorm()(m, name, state)
        m.register_forward_hook(lambda module, args, out: comm.gather_from_region(out, state.tp, self.dim))
        return m


@dataclass(frozen=True)
class SequenceParallelNorm:
    """A norm (or any replicated module) inside the sequence-parallel region: it sees only this rank's
    tokens, so its parameters' gradients are all-reduced over tp."""

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        from gptpar.parallel.tensor import mark_sequence_parallel

        for p in m.parameters():
            mark_sequence_parallel(p, state.tp)
        return m


class ParallelNanoGPTAttention(nn.Module):
    """nanoGPT's ``CausalSelfAttention`` over this rank's heads: same forward signature ``x [B, T, C]``."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        bias: bool,
        dropout: float,
        state: ParallelState,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        tp = state.tp.size
        if n_head % tp:
            raise GptparConfigError(f"n_head={n_head} is not divisible by tp={tp} (attention is split by heads)")
        self.n_head, self.n_embd, self.local_heads, self.dropout = n_head, n_embd, n_head // tp, dropout
        sp = dict(sequence_parallel=sequence_parallel, seq_dim=1)
        self.c_attn = ColumnParallelLinear(n_embd, 3 * n_embd, bias, group=state.tp, chunks=3, **sp)
        self.c_proj = RowParallelLinear(n_embd, n_embd, bias, group=state.tp, **sp)
        self.resid_dropout = nn.Dropout(dropout)

    @classmethod
    def from_module(
        cls, m: nn.Module, name: str, state: ParallelState, sequence_parallel: bool = False
    ) -> ParallelNanoGPTAttention:
        bias = m.c_attn.bias is not None
        dropout = getattr(m, "dropout", 0.0)
        new = cls(
            m.n_embd, m.n_head, bias, float(dropout if isinstance(dropout, float) else 0.0), state, sequence_parallel
        )
        new.to(device=m.c_attn.weight.device, dtype=m.c_attn.weight.dtype)
        load_full_(new.c_attn.weight, m.c_attn.weight.detach(), state.tp)
        load_full_(new.c_proj.weight, m.c_proj.weight.detach(), state.tp)
        if bias:
            load_full_(new.c_attn.bias, m.c_attn.bias.detach(), state.tp)
            with torch.no_grad():
                new.c_proj.bias.copy_(m.c_proj.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(x)  # [B, T, 3C/tp]: the whole sequence, even when x holds a shard of it
        B, T, _ = qkv.shape
        hd = self.n_embd // self.n_head
        q, k, v = (t.view(B, T, self.local_heads, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.local_heads * hd)))


def _sp_region(sequence_parallel: bool) -> dict:
    """Batch-first sequence parallelism over the block stack: enter at block 0, norms on shards, leave at
    ``ln_f`` (its output is gathered for the LM head)."""
    if not sequence_parallel:
        return {}
    return {
        "transformer.h.0": SequenceParallelEnter(dim=1),
        "transformer.h.*.ln_*": SequenceParallelNorm(),
        "transformer.ln_f": SequenceParallelExit(dim=1),
    }


def gpt2_plan(sequence_parallel: bool = False) -> dict:
    """Hugging Face ``GPT2LMHeadModel``: vocab-parallel embedding, q|k|v split per head, column/row MLP,
    LM head gathered (the stock loss then sees full logits); optionally Megatron sequence parallelism."""
    sp = sequence_parallel
    return {
        "transformer.wte": VocabEmbedding(),
        "transformer.wpe": Replicate(),
        **_sp_region(sp),
        "transformer.h.*.attn": Heads(("num_heads", "split_size")),
        "transformer.h.*.attn.c_attn": Colwise(chunks=3, sequence_parallel=sp),
        "transformer.h.*.attn.c_proj": Rowwise(sequence_parallel=sp),
        "transformer.h.*.mlp.c_fc": Colwise(sequence_parallel=sp),
        "transformer.h.*.mlp.c_proj": Rowwise(sequence_parallel=sp),
        "lm_head": Colwise(gather_output=True),
    }


def nanogpt_plan(sequence_parallel: bool = False) -> dict:
    """karpathy/nanoGPT's layout: ``transformer.{wte,wpe,h[i].{attn,mlp}}``, ``lm_head``."""
    sp = sequence_parallel
    return {
        "transformer.wte": VocabEmbedding(),
        "transformer.wpe": Replicate(),
        **_sp_region(sp),
        "transformer.h.*.attn": lambda m, n, st: ParallelNanoGPTAttention.from_module(m, n, st, sp),
        "transformer.h.*.mlp.c_fc": Colwise(sequence_parallel=sp),
        "transformer.h.*.mlp.c_proj": Rowwise(sequence_parallel=sp),
        "lm_head": Colwise(gather_output=True),
    }


def builtin_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        return gpt2_plan(sequence_parallel)
    try:
        attn = model.transformer.h[0].attn
        if isinstance(attn.c_attn, nn.Linear) and hasattr(attn, "n_head"):
            return nanogpt_plan(sequence_parallel)
    except (AttributeError, IndexError, TypeError):
        pass
    raise GptparConfigError(
        f"no built-in parallelisation plan for {name}; pass plan={{'module.pattern': Colwise() | Rowwise() | ...}}"
    )


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def parallelize(
    model: nn.Module, layout: ParallelLayout | ParallelState, plan: dict | None = None, sequence_parallel: bool = False
) -> nn.Module:
    """Tensor-parallelise ``model`` in place over ``layout``'s tp group; returns the model.
    ``sequence_parallel`` (built-in plans): norms, dropout and residuals of the block stack hold
    ``1/tp`` of the sequence; all-reduces become all-gather + reduce-scatter.

    Tied weights (e.g. an LM head tied to the embedding) stay tied when both sides are split the same
    way (``VocabEmbedding`` + ``Colwise``). Raises :class:`GptparConfigError` for a module the plan does not
    cover, a plan entry that matches nothing, or a size tp does not divide.
    """
    state = layout if isinstance(layout, ParallelState) else init_parallel(layout)
    plan = builtin_plan(model, sequence_parallel) if plan is None else plan
    tied = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            tied.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    used = set()
    replaced: dict[str, nn.Module] = {}
    names = [n for n, _ in model.named_modules() if n]
    for name in names:
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a module already replaced whole
        pat = next((p for p in plan if fnmatch.fnmatchcase(name, p)), None)  # the first matching entry wins
        if pat is None:
            continue
        used.add(pat)
        style = plan[pat]
        module = model.get_submodule(name)
        new = style(module, name, state)
        if new is not module:
            _set(model, name, new)
            replaced[name] = new
    unmatched = [pat for pat in plan if pat not in used]
    if unmatched:
        raise GptparConfigError(f"parallelize: plan entries {unmatched} match no module of {type(model).__name__}")
    for name, m in model.named_modules():
        covered = any(fnmatch.fnmatchcase(name, pat) for pat in plan) or any(name.startswith(r + ".") for r in replaced)
        if not covered and (isinstance(m, (nn.Linear, nn.Embedding)) or _is_conv1d(m)):
            raise GptparConfigError(
                f"parallelize: module {name!r} ({type(m).__name__}) is not covered by the plan; give it a style "
                "(Colwise, Rowwise, VocabEmbedding or Replicate)"
            )
    # Re-tie weights that were one tensor before and are now split the same way on both sides.
    for names_ in tied.values():
        if len(names_) > 1:
            mods = [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names_]
            first = getattr(*mods[0])
            for mod, attr in mods[1:]:
                other = getattr(mod, attr)
                if other is not first and other.shape == first.shape:
                    setattr(mod, attr, first)
    model.gptpar_state = state
    return model
