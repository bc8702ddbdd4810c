"""Drop-in tensor parallelism for a model you already have: ``gptpar.parallelize(model, state, plan)``.

Walks ``model`` and replaces, in place, each module the plan names with its tensor-parallel version,
sharding the existing weights, so the parallel model computes what the original did. A plan maps
module-name patterns (``fnmatch``: ``transformer.h.*.attn.c_attn``) to styles:

* :class:`Colwise` — a ``nn.Linear`` or HF ``Conv1D`` split by output features (``chunks``: fused blocks,
  e.g. 3 for q|k|v; ``heads``: a q, k or v projection of that many heads, K/V heads replicated when tp
  exceeds them; ``gather_output``: all-gather the result, e.g. an LM head feeding a stock loss; its output
  features need not divide by tp: the shards are padded and the padding never reaches the output);
* :class:`Rowwise` — split by input features, output all-reduced;
* :class:`VocabEmbedding` — an ``nn.Embedding`` split by rows (padded to a multiple of tp; ``padding_idx``
  honoured; ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` refused);
* :class:`Replicate` — keep as is (every rank holds it whole);
* :class:`SumGrads` — keep a module whole whose gradient is partial on each rank (a per-head q/k norm):
  its parameters' gradients are summed over tp;
* :class:`Heads` / :class:`HFAttention` — adjust an attention module's head bookkeeping to this rank's heads;
* any callable ``(module, name, state) -> module`` for anything else.

Never silently different: a style replaces only a module whose exact class it knows (a subclass of
``nn.Linear`` may compute something else: refused), nanoGPT's attention is replaced only after a probe
shows the module computes nanoGPT's causal self-attention, and every ``nn.Linear``, ``nn.Embedding`` and
``Conv1D`` must be covered (``Replicate`` is explicit). Built-in plans: Hugging Face ``GPT2LMHeadModel``,
nanoGPT's layout, and any transformers model whose config carries a ``base_model_tp_plan`` of column/row
styles (Llama, Mistral, Qwen2, Qwen3, ...).

After parallelising, clip with :func:`clip_grad_norm_` (it knows which parameters are sharded over which
group); torch's own ``clip_grad_norm_`` sees one rank's shard and would clip each rank differently, so a
training forward checks that tp-replicated parameters still agree across tp and fails loudly if not.
:func:`save_pretrained` writes a standard transformers directory; :func:`from_pretrained` loads one with each
rank reading only its slices.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gptpar.errors import GptparConfigError
from gptpar.parallel import comm
from gptpar.parallel.mesh import ParallelLayout, ParallelState, init_parallel
from gptpar.parallel.random import rank_local_forward, replicated_forward
from gptpar.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    head_split,
    load_full_,
    mark_sequence_parallel,
    shard_tensor,
    skip_init,
    tp_spec,
)


# ---------------------------------------------------------------------------------------------- helpers
def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers") and hasattr(m, "nf")


def _linear_params(m: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """Weight as ``[out, in]`` (nn.Linear's layout), bias, in, out — for exactly nn.Linear or HF Conv1D."""
    if type(m) is nn.Linear:
        return m.weight.detach(), (m.bias.detach() if m.bias is not None else None), m.in_features, m.out_features
    if _is_conv1d(m):  # y = x @ W + b with W [in, out]
        w = m.weight.detach()
        return w.t(), (m.bias.detach() if m.bias is not None else None), w.shape[0], w.shape[1]
    raise GptparConfigError(
        f"parallelize: {name!r} is a {type(m).__module__}.{type(m).__name__}, not exactly nn.Linear or transformers' "
        "Conv1D; a subclass may compute something else, so it is not replaced (give it a style of your own)"
    )


def _layout(p: torch.Tensor, conv1d: bool, rows: int | None) -> None:
    """How ``p`` maps back to the original module's tensor: transposed (Conv1D), first ``rows`` rows."""
    p.hf_layout = {"conv1d": conv1d, "rows": rows}


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


class _SeqShard:
    """Sequence parallelism of one parallelised model: the true sequence length of the current forward
    (set on entering the region), so any length works: the sequence is padded to a multiple of tp on
    entry, and every all-gather inside the region (and its exit) drops the padding."""

    def __init__(self, state: ParallelState, dim: int) -> None:
        self.tp, self.dim, self.length = state.tp, dim, None

    def pad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        extra = _round_up(x.shape[dim], self.tp.size) - x.shape[dim]
        if extra == 0:
            return x
        pad = [0, 0] * (x.dim() - dim % x.dim() - 1) + [0, extra]
        return F.pad(x, pad)

    def trim(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if self.length is None:
            raise GptparConfigError("sequence parallel: a module of the region ran before the region's entry")
        return x if x.shape[dim] == self.length else x.narrow(dim, 0, self.length)


_CALL: contextvars.ContextVar[dict] = contextvars.ContextVar("gptpar_parallelize_call")


def _seq_shard(state: ParallelState, dim: int) -> _SeqShard:
    call = _CALL.get(None)
    if call is None:  # a style applied outside parallelize(): its own context
        return _SeqShard(state, dim)
    return call.setdefault("seq", _SeqShard(state, dim))


def _sp_hooks(col: nn.Module | None, row: nn.Module | None, seq: _SeqShard, dim: int) -> None:
    if col is not None:
        col.register_forward_hook(lambda m, a, out: seq.trim(out, dim))
    if row is not None:
        row.register_forward_pre_hook(lambda m, a: (seq.pad(a[0], dim), *a[1:]))


# ---------------------------------------------------------------------------------------------- styles
@dataclass(frozen=True)
class Colwise:
    chunks: int = 1
    gather_output: bool = False
    sequence_parallel: bool = False  # input is sequence-sharded along seq_dim: all-gather it first
    seq_dim: int = 1
    heads: int | None = None  # a q, k or v projection of this many heads (K/V replicated when tp > heads)
    # The enclosing module's entry (SharedInput or SequenceParallelGather) already sums the input gradient
    # over tp: skip this linear's own all-reduce (one reduction for q, k and v together, not three).
    input_shared: bool = False

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        w, b, fin, fout = _linear_params(m, name)
        conv1d, tp = _is_conv1d(m), state.tp
        chunks, shared, rows = self.chunks, None, None
        if self.heads is not None:
            if self.chunks != 1 or self.gather_output:
                raise GptparConfigError(f"Colwise for {name!r}: heads= excludes chunks= and gather_output=")
            if fout % self.heads:
                raise GptparConfigError(f"{name!r}: out_features={fout} is not divisible into heads={self.heads}")
            try:
                _, sharing = head_split(self.heads, tp.size)
            except GptparConfigError as e:
                raise GptparConfigError(f"{name!r}: {e}") from None
            chunks = (self.heads,)
            shared = state.tp_subgroup(sharing) if sharing > 1 else None
        elif self.gather_output and fout % tp.size:  # e.g. an LM head over a vocabulary tp does not divide
            rows = fout
            fout = _round_up(fout, tp.size)
            w = _pad_rows(w, fout)
            b = _pad_rows(b, fout) if b is not None else None
        with skip_init():
            new = ColumnParallelLinear(
                fin,
                fout,
                b is not None,
                group=tp,
                gather_output=self.gather_output,
                chunks=chunks,
                sequence_parallel=self.sequence_parallel,
                seq_dim=self.seq_dim,
                shared_group=shared,
                reduce_input_grad=not self.input_shared,
                device=w.device,
                dtype=w.dtype,
            )
        load_full_(new.weight, w, tp)
        _layout(new.weight, conv1d, rows)
        if b is not None:
            load_full_(new.bias, b, tp)
            _layout(new.bias, False, rows)
        if rows is not None:  # the gathered output holds the padding last: drop it
            new.register_forward_hook(lambda mod, a, out: out[..., :rows])
        if self.sequence_parallel:
            _sp_hooks(new, None, _seq_shard(state, self.seq_dim), self.seq_dim)
        return new


@dataclass(frozen=True)
class Rowwise:
    sequence_parallel: bool = False  # reduce-scatter the output along seq_dim instead of all-reducing it
    seq_dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        w, b, fin, fout = _linear_params(m, name)
        with skip_init():
            new = RowParallelLinear(
                fin,
                fout,
                b is not None,
                group=state.tp,
                sequence_parallel=self.sequence_parallel,
                seq_dim=self.seq_dim,
                device=w.device,
                dtype=w.dtype,
            )
        load_full_(new.weight, w, state.tp)
        _layout(new.weight, _is_conv1d(m), None)
        if b is not None:
            with torch.no_grad():
                new.bias.copy_(b)
        if self.sequence_parallel:
            _sp_hooks(None, new, _seq_shard(state, self.seq_dim), self.seq_dim)
        return new


@dataclass(frozen=True)
class VocabEmbedding:
    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        if type(m) is not nn.Embedding:
            raise GptparConfigError(
                f"VocabEmbedding for {name!r}: expected exactly nn.Embedding, got {type(m).__module__}.{type(m).__name__}"
            )
        for opt, default in (("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False)):
            if getattr(m, opt) != default:
                raise GptparConfigError(
                    f"VocabEmbedding for {name!r}: nn.Embedding option {opt}={getattr(m, opt)!r} is not supported "
                    "by the vocab-parallel embedding (it would change the result); use Replicate()"
                )
        tp = state.tp
        rows = m.num_embeddings
        padded = _round_up(rows, tp.size)
        with skip_init():
            new = VocabParallelEmbedding(
                padded,
                m.embedding_dim,
                group=tp,
                padding_idx=m.padding_idx,
                device=m.weight.device,
                dtype=m.weight.dtype,
            )
        load_full_(new.weight, _pad_rows(m.weight.detach(), padded), tp)
        _layout(new.weight, False, rows if padded != rows else None)
        return new


@dataclass(frozen=True)
class Replicate:
    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        return m


@dataclass(frozen=True)
class SumGrads:
    """Keep the module whole on every rank; each rank's gradient of its parameters is partial (e.g. a
    per-head q/k norm applied to this rank's heads), so it is summed over tp as it is produced."""

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        for p in m.parameters():
            mark_sequence_parallel(p, state.tp)
        return m


@dataclass(frozen=True)
class Heads:
    """Divide integer attributes (head counts, split sizes) by tp, checking divisibility."""

    attrs: tuple[str, ...]
    cls: str | None = None  # the module's class name this applies to, checked

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        if self.cls is not None and type(m).__name__ != self.cls:
            raise GptparConfigError(
                f"parallelize: {name!r} is a {type(m).__name__}, not the {self.cls} the plan expects"
            )
        for a in self.attrs:
            v = getattr(m, a)
            if v % state.tp.size:
                raise GptparConfigError(f"{name}.{a}={v} is not divisible by tp={state.tp.size}")
            setattr(m, a, v // state.tp.size)
        return m


@dataclass(frozen=True)
class HFAttention:
    """A transformers attention module (q_proj/k_proj/v_proj/o_proj, shapes from ``-1`` views) over this
    rank's heads: its ``num_key_value_groups`` becomes local query heads per local K/V head."""

    n_head: int
    n_kv_head: int
    sequence_parallel: bool = False  # gather the sequence-sharded input on entry (SequenceParallelGather)
    share_input: bool = True  # one input-gradient all-reduce for q|k|v on entry (SharedInput)

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        if self.sequence_parallel:
            SequenceParallelGather()(m, name, state)
        elif self.share_input:
            SharedInput()(m, name, state)
        missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "num_key_value_groups") if not hasattr(m, a)]
        if missing or not type(m).__module__.startswith("transformers."):
            raise GptparConfigError(
                f"parallelize: {name!r} ({type(m).__name__}) is not a transformers attention with q/k/v/o projections "
                f"(lacks {missing}); give it a plan entry of your own"
            )
        try:
            q_local, _ = head_split(self.n_head, state.tp.size)
            kv_local, _ = head_split(self.n_kv_head, state.tp.size)
        except GptparConfigError as e:
            raise GptparConfigError(f"{name!r}: {e}") from None
        if q_local % kv_local:
            raise GptparConfigError(f"{name!r}: {q_local} local query heads do not group over {kv_local} K/V heads")
        m.num_key_value_groups = q_local // kv_local
        return m


@dataclass(frozen=True)
class SequenceParallelEnter:
    """Enter the sequence-parallel region at this module's input: pad the sequence (dimension ``dim``) to
    a multiple of tp and keep this rank's ``1/tp`` of it; the gradient is all-gathered on the way back."""

    dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        seq = _seq_shard(state, self.dim)

        def enter(x):
            seq.length = x.shape[self.dim]
            return comm.scatter_to_region(seq.pad(x, self.dim), state.tp, self.dim)

        m.register_forward_pre_hook(lambda mod, args, kwargs: _first_input(args, kwargs, enter), with_kwargs=True)
        return m


def _first_input(args: tuple, kwargs: dict, fn, key: str = "hidden_states"):
    """Apply ``fn`` to a module call's first input: positional, or the ``key`` keyword (else the first)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    k = key if key in kwargs else next(iter(kwargs))
    return args, {**kwargs, k: fn(kwargs[k])}


@dataclass(frozen=True)
class SharedInput:
    """A module whose column-parallel linears all read its input (q|k|v of an attention, gate|up of an
    MLP): the input's gradient is all-reduced over tp once on entry (backward), instead of once per
    linear; those linears take ``Colwise(input_shared=True)``."""

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        def share(x):
            return comm.copy_to_region(x, state.tp)

        m.register_forward_pre_hook(lambda mod, args, kwargs: _first_input(args, kwargs, share), with_kwargs=True)
        return m


@dataclass(frozen=True)
class SequenceParallelGather:
    """A module inside the sequence-parallel region that needs the whole sequence (an attention or MLP
    whose forward reads shapes from its input): all-gather its input along ``dim`` on entry (padding
    dropped); backward reduce-scatters, which also sums the input gradient over tp, so the column linears
    inside take ``Colwise(input_shared=True)``."""

    dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        seq = _seq_shard(state, self.dim)

        def gather(x):
            return seq.trim(comm.gather_along_seq(x, state.tp, self.dim), self.dim)

        m.register_forward_pre_hook(lambda mod, args, kwargs: _first_input(args, kwargs, gather), with_kwargs=True)
        return m


@dataclass(frozen=True)
class SequenceParallelExit:
    """Leave the sequence-parallel region at this module's output (all-gather along ``dim``, padding
    dropped); the module itself (a norm) runs on the sequence shard, so its parameters' gradients are
    all-reduced over tp."""

    dim: int = 1

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        seq = _seq_shard(state, self.dim)
        SequenceParallelNorm()(m, name, state)
        m.register_forward_hook(
            lambda module, args, out: seq.trim(comm.gather_from_region(out, state.tp, self.dim), self.dim)
        )
        return m


@dataclass(frozen=True)
class SequenceParallelNorm:
    """A norm (or any replicated module) inside the sequence-parallel region: it sees only this rank's
    tokens, so its parameters' gradients are all-reduced over tp."""

    def __call__(self, m: nn.Module, name: str, state: ParallelState) -> nn.Module:
        for p in m.parameters():
            mark_sequence_parallel(p, state.tp)
        return m


# ---------------------------------------------------------------------------------------------- nanoGPT
_NANOGPT_CHILDREN = {"c_attn", "c_proj", "attn_dropout", "resid_dropout"}


def _nanogpt_reference(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT's causal self-attention computed from ``m``'s weights (what the replacement computes)."""
    B, T, C = x.shape
    q, k, v = m.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, m.n_head, C // m.n_head).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return m.c_proj(y.transpose(1, 2).reshape(B, T, C))


def check_nanogpt_attention(m: nn.Module, name: str) -> None:
    """Prove ``m`` is nanoGPT's ``CausalSelfAttention`` before replacing it: exactly its submodules
    (``c_attn``, ``c_proj`` as nn.Linear, dropouts) and, on a probe input, exactly its output."""
    children = {n for n, _ in m.named_children()}
    params = {n for n, _ in m.named_parameters()}
    allowed = {"c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"}
    why = None
    if not children <= _NANOGPT_CHILDREN or not params <= allowed:
        why = f"it has {sorted(children - _NANOGPT_CHILDREN) or sorted(params - allowed)} beyond nanoGPT's"
    elif type(getattr(m, "c_attn", None)) is not nn.Linear or type(getattr(m, "c_proj", None)) is not nn.Linear:
        why = "its c_attn/c_proj are not nn.Linear"
    elif not isinstance(getattr(m, "n_head", None), int) or not isinstance(getattr(m, "n_embd", None), int):
        why = "it lacks integer n_head / n_embd"
    elif m.c_attn.weight.device.type != "meta":
        was = m.training
        m.eval()
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(2, 5, m.n_embd, generator=g).to(m.c_attn.weight.device, m.c_attn.weight.dtype)
        try:
            with torch.no_grad():
                got, want = m(x), _nanogpt_reference(m, x)
            diff = (got - want).abs().max().item()
            scale = want.abs().max().item() + 1e-6
            if diff > 1e-4 * scale:
                why = (
                    f"its output differs from nanoGPT's causal self-attention by {diff:.3g} (of {scale:.3g}) on a probe"
                )
        except Exception as e:  # a different forward signature or shape rule
            why = f"its forward on a probe input [2, 5, {m.n_embd}] failed ({type(e).__name__}: {e})"
        finally:
            m.train(was)
    if why:
        raise GptparConfigError(
            f"parallelize: {name!r} ({type(m).__name__}) is not nanoGPT's CausalSelfAttention: {why}. It is not "
            "replaced; pass a plan with a style for it (e.g. a parallel module of your own)"
        )


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
        with skip_init():
            self.c_attn = ColumnParallelLinear(n_embd, 3 * n_embd, bias, group=state.tp, chunks=3, **sp)
            self.c_proj = RowParallelLinear(n_embd, n_embd, bias, group=state.tp, **sp)
        self.resid_dropout = nn.Dropout(dropout)
        if sequence_parallel:
            _sp_hooks(self.c_attn, self.c_proj, _seq_shard(state, 1), 1)

    @classmethod
    def from_module(
        cls, m: nn.Module, name: str, state: ParallelState, sequence_parallel: bool = False
    ) -> ParallelNanoGPTAttention:
        check_nanogpt_attention(m, name)
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
        for p in new.parameters():
            _layout(p, False, None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(x)  # [B, T, 3C/tp]: the whole sequence, even when x holds a shard of it
        B, T, _ = qkv.shape
        hd = self.n_embd // self.n_head
        q, k, v = (t.view(B, T, self.local_heads, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, self.local_heads * hd)))


# ---------------------------------------------------------------------------------------------- plans
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
        "transformer.h.*.attn": Heads(("num_heads", "split_size"), cls="GPT2Attention"),
        "transformer.h.*.attn.c_attn": Colwise(chunks=3, sequence_parallel=sp),
        "transformer.h.*.attn.c_proj": Rowwise(sequence_parallel=sp),
        "transformer.h.*.mlp.c_fc": Colwise(sequence_parallel=sp),
        "transformer.h.*.mlp.c_proj": Rowwise(sequence_parallel=sp),
        "lm_head": Colwise(gather_output=True),
    }


def nanogpt_plan(sequence_parallel: bool = False) -> dict:
    """karpathy/nanoGPT's layout: ``transformer.{wte,wpe,h[i].{attn,mlp}}``, ``lm_head``. The attention is
    replaced only once proven to be nanoGPT's (:func:`check_nanogpt_attention`)."""
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


_HF_STYLES = ("colwise", "rowwise", "replicated_with_grad_allreduce")


def _is_hf_mlp(m: nn.Module) -> bool:
    """A transformers gated MLP, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: gate and up read its input."""
    children = {n for n, _ in m.named_children()}
    return (
        type(m).__module__.startswith("transformers.")
        and type(m).__name__.endswith("MLP")
        and children == {"gate_proj", "up_proj", "down_proj", "act_fn"}
    )


def hf_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    """A plan from a transformers model's own ``config.base_model_tp_plan`` (Llama, Mistral, Qwen2, Qwen3,
    ...): its column/row styles, q/k/v by heads (K/V replicated when tp > num_key_value_heads), per-head
    norms' gradients summed, a vocab-parallel input embedding and a gathered LM head; optionally sequence
    parallelism over the decoder layers. A style gptpar has no equivalent for is refused by name."""
    cfg = model.config
    base = dict(getattr(cfg, "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "model")
    cls = type(model).__name__
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    sp = sequence_parallel
    plan: dict = {}
    attn: set[str] = set()
    gathered: set[str] = set()  # modules whose column linears read a gathered sequence (SP)
    for pat, style in base.items():
        full = f"{prefix}.{pat}"
        parent, _, leaf = full.rpartition(".")
        if style == "colwise":
            heads = {"q_proj": n_head, "k_proj": n_kv, "v_proj": n_kv}.get(leaf)
            if heads is not None:
                attn.add(parent)
            else:
                gathered.add(parent)
            plan[full] = Colwise(heads=heads, input_shared=True)
        elif style == "rowwise":
            plan[full] = Rowwise(sequence_parallel=sp)
        elif style == "replicated_with_grad_allreduce":
            plan[full] = SumGrads()
        else:
            raise GptparConfigError(
                f"{cls}: its tensor-parallel plan gives {full!r} the style {style!r}, which gptpar does not implement "
                f"(supported: {_HF_STYLES}); pass plan= of your own"
            )
    for a in attn:
        plan[a] = HFAttention(n_head, n_kv, sequence_parallel=sp)
    for g in gathered - attn:
        mods = [m for n, m in model.named_modules() if fnmatch.fnmatchcase(n, g)]
        if mods and all(_is_hf_mlp(m) for m in mods):  # gate and up both read the module's input
            plan[g] = SequenceParallelGather() if sp else SharedInput()
            continue
        if sp:
            raise GptparConfigError(
                f"{cls}: sequence parallelism needs to gather the input of {g!r} ({type(mods[0]).__name__ if mods else '?'}), "
                "which is not a known gate/up/down MLP; parallelise without sequence_parallel or pass a plan"
            )
        for pat in [p for p in plan if p.startswith(g + ".")]:  # unknown module: each linear reduces its own
            if isinstance(plan[pat], Colwise):
                plan[pat] = Colwise(heads=plan[pat].heads)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    plan[embed_name] = VocabEmbedding()
    plan["lm_head"] = Colwise(gather_output=True)
    if sp:
        layers = f"{prefix}.layers"
        first = model.get_submodule(f"{layers}.0")
        norms = [n for n, m in first.named_children() if "norm" in type(m).__name__.lower()]
        plan = {
            f"{layers}.0": SequenceParallelEnter(dim=1),
            **{f"{layers}.*.{n}": SequenceParallelNorm() for n in norms},
            f"{prefix}.norm": SequenceParallelExit(dim=1),
            **plan,
        }
    return plan


def builtin_plan(model: nn.Module, sequence_parallel: bool = False) -> dict:
    name = type(model).__name__
    if name == "GPT2LMHeadModel":
        return gpt2_plan(sequence_parallel)
    config = getattr(model, "config", None)
    if getattr(config, "base_model_tp_plan", None) and hasattr(model, "lm_head"):
        return hf_plan(model, sequence_parallel)
    try:
        attn = model.transformer.h[0].attn
        if isinstance(attn.c_attn, nn.Linear) and hasattr(attn, "n_head"):
            return nanogpt_plan(sequence_parallel)
    except (AttributeError, IndexError, TypeError):
        pass
    raise GptparConfigError(
        f"no built-in parallelisation plan for {name}; pass plan={{'module.pattern': Colwise() | Rowwise() | ...}}"
    )


# ---------------------------------------------------------------------------------------------- parallelize
def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


_STATE_OF: dict[int, tuple] = {}  # id(parameter) -> (weakref to it, its model's ParallelState)


def parallelize(
    model: nn.Module,
    layout: ParallelLayout | ParallelState,
    plan: dict | None = None,
    sequence_parallel: bool = False,
    check_replicas: bool = True,
) -> nn.Module:
    """Tensor-parallelise ``model`` in place over ``layout``'s tp group; returns the model.
    ``sequence_parallel`` (built-in plans): norms, dropout and residuals of the block stack hold
    ``1/tp`` of the sequence (any length: padded internally; generation works); all-reduces become
    all-gather + reduce-scatter.

    Tied weights (e.g. an LM head tied to the embedding) stay tied when both sides are split the same
    way (``VocabEmbedding`` + ``Colwise``). Raises :class:`GptparConfigError` for a module the plan does not
    cover, a plan entry that matches nothing, a module a style does not know, or a size tp cannot split.
    ``check_replicas``: a training forward verifies (when parameters changed) that tp-replicated
    parameters agree across tp, one small all-reduce; disable only if you clip with :func:`clip_grad_norm_`.
    ``model.save_pretrained(dir)`` then writes the full model (:func:`save_pretrained`).
    """
    state = layout if isinstance(layout, ParallelState) else init_parallel(layout)
    plan = builtin_plan(model, sequence_parallel) if plan is None else plan
    _replace(model, state, plan)
    _finish(model, state, sequence_parallel, check_replicas)
    _rank_local_dropout(model, state, plan)
    return model


def _attention_dropout(m: nn.Module) -> float:
    """The attention-probability dropout of an attention module: transformers' ``attention_dropout``,
    GPT-2's ``attn_dropout``, the replaced nanoGPT attention's ``dropout`` (0.0 when it has none)."""
    for attr in ("attention_dropout", "attn_dropout", "dropout"):
        v = getattr(m, attr, None)
        p = v.p if isinstance(v, nn.Dropout) else v
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return float(p)
    return 0.0


def _rank_local_dropout(model: nn.Module, state: ParallelState, plan: dict) -> None:
    """Megatron's rule for dropout under tp, as the original model draws it: where each rank holds
    different data (the probabilities of its attention heads; with sequence parallelism every activation
    of the block stack, a different part of the sequence on every rank) each rank draws its own mask;
    where every rank holds the same activations (the residual stream without SP), the same mask. Without
    it every rank would draw the same masks everywhere: repeated across head groups and sequence shards.
    Installed where a dropout probability is > 0 (training only; eval and p = 0 draw nothing extra)."""
    if state.tp.size == 1:
        return
    heads, regions = [], []
    for name, m in model.named_modules():
        style = next((plan[p] for p in plan if fnmatch.fnmatchcase(name, p)), None)
        if isinstance(style, (HFAttention, Heads)) or isinstance(m, ParallelNanoGPTAttention):
            heads.append(name)
        if isinstance(style, SequenceParallelEnter):
            regions.append(name.rpartition(".")[0] + ".")  # the block stack the region spans
    probs = {f"{h}.attn_dropout" for h in heads}  # GPT-2's attention-probability dropout module
    rank = state.tp.rank
    if regions:  # sequence parallel: every dropout in a block is on a shard or over local heads
        blocks = {n for n, _ in model.named_modules() for r in regions if n.startswith(r) and "." not in n[len(r) :]}
        for b in sorted(blocks):
            block = model.get_submodule(b)
            drops = [m for m in block.modules() if isinstance(m, nn.Dropout) and m.p > 0]
            attn = [model.get_submodule(h) for h in heads if h.startswith(b + ".")]
            if drops or any(_attention_dropout(a) for a in attn):
                rank_local_forward(block, rank)
        return
    for h in heads:
        attn = model.get_submodule(h)
        if not _attention_dropout(attn):
            continue
        rank_local_forward(attn, rank)
        for name, m in attn.named_modules():
            if isinstance(m, nn.Dropout) and m.p > 0 and f"{h}.{name}" not in probs:
                replicated_forward(m)  # after the output projection: every rank holds the same activations


def _replace(model: nn.Module, state: ParallelState, plan: dict) -> None:
    """Apply ``plan`` to ``model`` (one parallelize call: its styles share one sequence-parallel context)."""
    token = _CALL.set({})
    try:
        _apply(model, state, plan)
    finally:
        _CALL.reset(token)


def _apply(model: nn.Module, state: ParallelState, plan: dict) -> None:
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


def _finish(model: nn.Module, state: ParallelState, sequence_parallel: bool, check_replicas: bool) -> None:
    model.gptpar_state = state
    model.gptpar_sequence_parallel = sequence_parallel
    for k in [k for k, (ref, _) in _STATE_OF.items() if ref() is None]:
        del _STATE_OF[k]
    for p in model.parameters():
        _STATE_OF[id(p)] = (weakref.ref(p), state)
    if check_replicas and state.tp.size > 1:
        _install_replica_check(model, state)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        model.save_pretrained = lambda directory, **kw: save_pretrained(model, directory, **kw)


# ---------------------------------------------------------------------------------------------- clipping
def state_of(params) -> ParallelState | None:
    """The ParallelState of the parallelised model these parameters belong to (None if none does)."""
    for p in params:
        ref, st = _STATE_OF.get(id(p), (None, None))
        if ref is not None and ref() is p:
            return st
    return None


@torch.no_grad()
def clip_grad_norm_(
    parameters, max_norm: float, norm_type: float = 2.0, state: ParallelState | None = None
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a parallelised model: the norm of the whole model's gradient
    (each parameter counted once across tp shards, tp replicas, K/V heads shared by a few ranks and
    pipeline-tied copies), the same clip coefficient on every rank. Returns the total norm (before
    clipping). ``state`` is found from the parameters when they belong to a :func:`parallelize` model."""
    from gptpar.parallel.grad_norm import clip_grad_norm_ as clip

    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if float(norm_type) != 2.0:
        raise GptparConfigError(f"clip_grad_norm_: norm_type={norm_type} is not supported (the global L2 norm only)")
    state = state or state_of(params)
    if state is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return clip(params, max_norm, state)


def _install_replica_check(model: nn.Module, state: ParallelState) -> None:
    replicated = [p for p in model.parameters() if tp_spec(p)[0] is None]
    if not replicated:
        return
    seen = [None]

    def check(module, args):
        if not (module.training and torch.is_grad_enabled()):
            return
        version = tuple(p._version for p in replicated)
        if version == seen[0]:
            return  # nothing changed since the last check (e.g. gradient accumulation)
        seen[0] = version
        with torch.no_grad():
            sums = torch.stack([torch.stack([p.float().sum(), p.float().pow(2).sum()]) for p in replicated]).sum(0)
            both = torch.cat([sums, -sums])
            comm.all_reduce(both, state.tp, op=comm.ReduceOp.MAX)
        if not torch.equal(both[:2], -both[2:]):
            raise GptparConfigError(
                f"parallelize: the tp-replicated parameters (norms, biases, position embeddings) differ across the "
                f"tp ranks (rank {state.rank}) after the last update: the ranks no longer hold one model. The usual "
                "cause is torch.nn.utils.clip_grad_norm_, which sees only this rank's shard of the gradient and "
                "clips each rank by a different factor: use gptpar.clip_grad_norm_(model.parameters(), max_norm)"
            )

    model.register_forward_pre_hook(check)


# ---------------------------------------------------------------------------------------------- save / load
def full_tensor(p: torch.Tensor, state: ParallelState, t: torch.Tensor | None = None) -> torch.Tensor:
    """The original module's tensor (orientation, unpadded) of parameter ``p`` (or of ``t``, e.g. its
    gradient, laid out like ``p``) from every tp rank's piece. Collective over tp."""
    from gptpar.models.parallel_gpt import gather_full

    t = gather_full((p if t is None else t).detach(), tp_spec(p), state.tp)
    layout = getattr(p, "hf_layout", None) or {}
    if layout.get("rows") is not None:
        t = t[: layout["rows"]]
    if layout.get("conv1d") and t.dim() == 2:
        t = t.t()
    return t.contiguous()


def save_pretrained(model: nn.Module, directory: str, state: ParallelState | None = None, **kwargs) -> None:
    """Write the parallelised transformers ``model`` as a standard transformers directory (config.json,
    model.safetensors) with the original module layout (Conv1D orientation, unpadded vocabulary, K/V heads
    once): ``from_pretrained`` loads it with no missing or unexpected keys and reproduces the parallel
    model's logits. Collective over the model's tp group; global rank 0 writes."""
    from safetensors.torch import save_file

    unknown = set(kwargs) - {"safe_serialization", "is_main_process", "max_shard_size"}
    if unknown:
        raise GptparConfigError(
            f"save_pretrained: options {sorted(unknown)} are not supported for a parallelised model"
        )
    state = state or getattr(model, "gptpar_state", None)
    if state is None:
        raise GptparConfigError("save_pretrained: the model was not parallelised (no gptpar_state); pass state=")
    tensors = {}
    for name, p in model.named_parameters():  # a tied parameter once, under its first name
        t = full_tensor(p, state)
        if state.rank == 0:
            tensors[name] = t.cpu()
    persistent = set(model.state_dict().keys())
    for name, b in model.named_buffers():
        if name in persistent and state.rank == 0:
            tensors[name] = b.detach().cpu().contiguous()
    if state.rank == 0:
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(directory)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(directory)
    comm.barrier(state.world)


@contextlib.contextmanager
def _params_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init cost); buffers
    (e.g. rotary frequencies) stay real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_local(weights, name: str, p: torch.Tensor, state: ParallelState) -> torch.Tensor:
    """This rank's piece of parameter ``p`` read from the stored tensor ``name``: only its rows/columns."""
    from gptpar.models.hf import _runs
    from gptpar.parallel.tensor import full_length

    stored = weights.slice(name)
    layout = getattr(p, "hf_layout", None) or {}
    conv1d = bool(layout.get("conv1d")) and p.dim() == 2
    dim, chunks = tp_spec(p)
    shape = tuple(stored.get_shape())
    want = tuple(reversed(shape)) if conv1d else shape
    if dim is None:
        if want != tuple(p.shape):
            raise GptparConfigError(f"{weights.path!r}: {name} has shape {shape}, the model's is {tuple(p.shape)}")
        t = stored.read((0, shape[0]))
        return (t.t() if conv1d else t).to(p.dtype)
    true_rows = want[dim]
    total = full_length(p.shape[dim], chunks, state.tp.size)
    if (layout.get("rows") or total) != true_rows or any(want[d] != p.shape[d] for d in range(p.dim()) if d != dim):
        raise GptparConfigError(
            f"{weights.path!r}: {name} has shape {shape}, which does not fit the model's parameter "
            f"(local {tuple(p.shape)}, split along dim {dim})"
        )
    index = shard_tensor(torch.arange(total), 0, chunks, state.tp.size, state.tp.rank)
    sdim = 1 - dim if conv1d else dim
    parts = []
    for a, b in _runs(index):
        hi = min(b, true_rows)
        if a < hi:
            piece = stored.read((a, hi)) if sdim == 0 else stored.read((0, shape[0]), (a, hi))
            parts.append(piece)
        if b > hi:  # padded rows (vocabulary padded to a multiple of tp)
            pad_shape = list(shape)
            pad_shape[sdim] = b - max(a, hi)
            parts.append(torch.zeros(pad_shape, dtype=stored.dtype))
    t = torch.cat(parts, dim=sdim)
    return (t.t() if conv1d else t).contiguous().to(p.dtype)


def from_pretrained(
    path: str,
    layout: ParallelLayout | ParallelState,
    plan: dict | None = None,
    sequence_parallel: bool = False,
    dtype: torch.dtype | None = None,
    **options,
) -> nn.Module:
    """Load a transformers causal LM directory for tensor parallelism without a full copy on any rank:
    the model is built with its parameters on the meta device, parallelised, and each rank then reads
    only its own slices of each tensor from the safetensors (:class:`gptpar.models.hf.HFWeights`). Returns
    the parallelised model in eval mode, as ``transformers.AutoModelForCausalLM.from_pretrained`` does."""
    import transformers

    from gptpar.models.hf import HFWeights

    state = layout if isinstance(layout, ParallelState) else init_parallel(layout)
    config = transformers.AutoConfig.from_pretrained(path)
    with _params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config)
    if dtype is not None:
        model.to(dtype)
    _replace(model, state, builtin_plan(model, sequence_parallel) if plan is None else plan)
    weights = HFWeights(path)
    try:
        aliases: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(n)
        done: dict[int, nn.Parameter] = {}
        for mod in model.modules():
            for pname, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                if id(p) not in done:
                    src = next((n for n in aliases[id(p)] if n in weights.files), None)
                    if src is None:
                        raise GptparConfigError(f"{path!r} has no tensor for {aliases[id(p)]}")
                    new = nn.Parameter(_read_local(weights, src, p, state), requires_grad=p.requires_grad)
                    for k, v in vars(p).items():
                        if not k.startswith("_"):
                            setattr(new, k, v)
                    if getattr(new, "grad_reduce", None) is not None:
                        new.register_hook(new.grad_reduce)
                    done[id(p)] = new
                mod._parameters[pname] = done[id(p)]
    finally:
        weights.close()
    _finish(model, state, sequence_parallel, options.get("check_replicas", True))
    return model.eval()
