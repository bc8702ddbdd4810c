"""The parallel GPT (tensor, sequence and context parallel), built from the same :class:`GPTConfig` as
the reference and with the same parameter names, so a reference state dict shards into it and gathers
back out of it.

Shapes: ``idx [b, s]`` -> ``logits [b, s/cp, V/tp]`` (this rank's tokens and vocab slice; the loss never
gathers them). The residual stream is ``[s/cp, b, h]``, or ``[s/(cp*tp), b, h]`` with sequence parallelism
(sequence first, as Megatron, so SP splits dim 0).
Per layer, forward: two all-reduces over tp (after the attention and MLP row-parallel projections), or
with SP two all-gathers + two reduce-scatters of the same total volume; backward: the mirror images.
With cp: ring attention's K/V shifts (or Ulysses' all-to-alls) inside each attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPTConfig, check_sequence, init_gpt_weights, make_norm, rope_for
from gptpar.ops.attention import attention
from gptpar.ops.rope import rope_qkv
from gptpar.parallel import comm
from gptpar.parallel.context import SeqShard, ring_attention, seq_shards, ulysses_attention
from gptpar.parallel.mesh import Group, ParallelState
from gptpar.parallel.random import TPRngTracker, check_same_default_rng
from gptpar.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    head_split,
    mark_sequence_parallel,
    shard_tensor,
    skip_init,
    tp_spec,
    unshard_tensor,
    vocab_parallel_cross_entropy,
)

CP_IMPLS = ("ring", "ulysses")


class ParallelSelfAttention(nn.Module):
    """Causal self-attention over this rank's ``n_head/tp`` query heads (and the K/V heads they read) and,
    with cp, its share of the tokens.

    ``[s', b, h] -> [s', b, h]`` where ``s'`` is this rank's tokens (``s/cp``, and ``/tp`` again with
    sequence parallelism). Grouped-query attention: K/V heads are split over tp when tp divides
    ``n_kv_head``; when tp is a multiple of it, each K/V head lives on the tp/n_kv_head ranks whose query
    heads read it, and its weight gradient is summed over exactly those ranks (``state.tp_subgroup``).
    Rotary positions rotate q and k at each token's global position (:attr:`rope`, set per forward).
    """

    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        rng: TPRngTracker | None = None,
        sequence_parallel: bool = False,
        cp_impl: str = "ring",
    ) -> None:
        super().__init__()
        group = state.tp
        self.config, self.group, self.cp, self.rng, self.cp_impl = config, group, state.cp, rng, cp_impl
        self.sequence_parallel = sequence_parallel and group.size > 1
        self.local_heads = config.n_head // group.size
        self.local_kv_heads, sharing = head_split(config.n_kv_head, group.size)
        self.shards: list[SeqShard] | None = None  # set by ParallelGPT.forward for the current sequence
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin) of this rank's tokens, ditto
        self.doc_mask: torch.Tensor | None = None  # [b, 1, s, s] packed documents' mask, ditto (cp == 1)
        self.doc_ids: torch.Tensor | None = None  # [b, s] packed documents' ids, ditto (for cp > 1)
        sp = sequence_parallel
        self.qkv = ColumnParallelLinear(
            config.d_model,
            config.q_size + 2 * config.kv_size,
            bias=config.qkv_bias,
            group=group,
            chunks=config.qkv_chunks,
            sequence_parallel=sp,
            shared_group=state.tp_subgroup(sharing) if sharing > 1 else None,
        )
        self.proj = RowParallelLinear(
            config.q_size, config.d_model, bias=config.bias, group=group, sequence_parallel=sp
        )
        if config.qk_norm:  # replicated weights applied to this rank's heads: gradients summed over tp
            self.q_norm = make_norm(config, fused=True, size=config.head_dim)
            self.k_norm = make_norm(config, fused=True, size=config.head_dim)
            for prm in (self.q_norm.weight, self.k_norm.weight):
                mark_sequence_parallel(prm, group)
        self.resid_drop = nn.Dropout(config.dropout)

    def _core(self, q, k, v):
        p = self.config.dropout if self.training else 0.0
        if self.cp.size > 1:
            if self.cp_impl == "ulysses":
                return ulysses_attention(q, k, v, self.cp, self.shards, causal=True, doc_ids=self.doc_ids)
            return ring_attention(q, k, v, self.cp, self.shards, causal=True, doc_ids=self.doc_ids)[0]
        if self.doc_ids is not None and self.doc_mask is None:  # the flash kernel masks documents itself
            return attention(q, k, v, True, None, None, None, (self.doc_ids, self.doc_ids))[0]
        gqa = k.shape[1] != q.shape[1]
        # causal, or causal within each packed document
        mask = {"is_causal": True} if self.doc_mask is None else {"attn_mask": self.doc_mask}
        if p > 0.0:  # attention dropout: SDPA, on this tp rank's own RNG stream (its heads' masks are its own)
            with self.rng.fork() if self.rng is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, enable_gqa=gqa, **mask)
        # One rank holds the whole sequence and needs no log-sum-exp: torch's fused SDPA kernel (it saves the
        # same q, k, v, out and lse as gptpar.ops.attention, and is faster than the matmul reference op).
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, **mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        s, b = qkv.shape[:2]
        nh, nkv, hd = self.local_heads, self.local_kv_heads, self.config.head_dim
        qkv = qkv.view(s, b, nh + 2 * nkv, hd)
        if self.config.qk_norm:
            qkv = torch.cat(
                [self.q_norm(qkv[:, :, :nh]), self.k_norm(qkv[:, :, nh : nh + nkv]), qkv[:, :, nh + nkv :]], 2
            )
        if self.rope is not None:
            qkv = rope_qkv(qkv, *self.rope, nh + nkv)  # q and k heads, one pass (Triton on GPUs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.split([nh, nkv, nkv], dim=2))  # [b, heads, s, hd]
        y = self._core(q, k, v).permute(2, 0, 1, 3).reshape(s, b, nh * hd)
        return sharded_dropout(self.resid_drop, self.proj(y), self.rng, self.sequence_parallel)


def sharded_dropout(drop: nn.Dropout, x: torch.Tensor, rng: TPRngTracker | None, sharded: bool) -> torch.Tensor:
    """Dropout on ``x``; when ``x`` is sharded across tp (sequence parallelism), on the tp rank's own stream
    (its tokens differ from the other ranks', so must its masks)."""
    if sharded and rng is not None and drop.training and drop.p > 0:
        with rng.fork():
            return drop(x)
    return drop(x)


class ParallelMLP(nn.Module):
    """Column-parallel fc (gate|up blocks for SwiGLU), activation, row-parallel proj. ``[s', b, h] -> [s', b, h]``."""

    def __init__(
        self, config: GPTConfig, group: Group, sequence_parallel: bool = False, rng: TPRngTracker | None = None
    ) -> None:
        super().__init__()
        self.config, self.rng = config, rng
        self.sequence_parallel = sequence_parallel and group.size > 1
        swiglu = config.activation == "swiglu"
        fc_out = 2 * config.ffn_hidden if swiglu else config.ffn_hidden
        sp = sequence_parallel
        self.fc = ColumnParallelLinear(  # activation fused into the GEMM (gptpar.ops.mlp)
            config.d_model,
            fc_out,
            bias=config.bias,
            group=group,
            chunks=2 if swiglu else 1,
            sequence_parallel=sp,
            activation=config.activation,
        )
        self.proj = RowParallelLinear(
            config.ffn_hidden, config.d_model, bias=config.bias, group=group, sequence_parallel=sp
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sharded_dropout(self.drop, self.proj(self.fc(x)), self.rng, self.sequence_parallel)


class ParallelBlock(nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        rng: TPRngTracker | None = None,
        sequence_parallel: bool = False,
        cp_impl: str = "ring",
    ) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, fused=True)
        self.attn = ParallelSelfAttention(config, state, rng, sequence_parallel, cp_impl)
        self.ln_2 = make_norm(config, fused=True)
        self.mlp = ParallelMLP(config, state.tp, sequence_parallel, rng)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ParallelGPT(nn.Module):
    """GPT split over ``state.tp`` (tensor parallel) and ``state.cp`` (context parallel), optionally only
    one pipeline stage of it.

    ``forward(idx [b, s], targets [b, s] | None) -> (logits [b, s/cp, V/tp], mean loss | None)``: ``idx``
    is the whole sequence (the same on every tp and cp rank); each cp rank keeps its shard's tokens
    (:meth:`local_positions`) and returns their logits for this rank's vocab slice. The loss is the global
    mean over all tokens, the same scalar on every rank, equal to the reference model's.

    Options: ``sequence_parallel`` (Megatron SP: norms, dropout and residuals hold ``[s/tp, b, h]``);
    ``recompute`` (full activation recomputation: each block keeps only its input for backward);
    ``cp_impl`` ``"ring"`` or ``"ulysses"``; ``cp_sharding`` ``"zigzag"`` or ``"contiguous"``.
    With cp > 1, every parameter's gradient is partial per cp rank: sum it over cp (and dp) after
    backward. :class:`gptpar.parallel.data.DataParallel` does it in its buckets (it reduces over dp x cp);
    :func:`gptpar.parallel.data.allreduce_gradients` is the plain tool.

    ``units=(a, b)`` builds only pipeline units ``a..b-1`` of ``[embedding, block 0, ..., block L-1, head]``
    (see :mod:`gptpar.parallel.pipeline`): a stage without the embedding takes the hidden state
    ``[s', b, h]`` as ``idx``; a stage without the head returns the hidden state. Parameter names stay
    global (``blocks.7.attn.qkv.weight``). With tied embeddings split across stages, the head holds its
    own copy of the embedding, initialised identically; :meth:`tied_parameters` lists it for the
    pipeline engine, which sums the two copies' gradients.

    ``init_weights=False`` leaves the parameters uninitialised, for a load right after (e.g.
    :func:`gptpar.models.hf.from_hf`, which reads each rank's slices).
    """

    def __init__(
        self,
        config: GPTConfig,
        state: ParallelState,
        seed: int | None = None,
        *,
        sequence_parallel: bool = False,
        cp_impl: str = "ring",
        cp_sharding: str = "zigzag",
        units: tuple[int, int] | None = None,
        recompute: bool = False,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        with contextlib.nullcontext() if init_weights else skip_init():
            self._build(config, state, seed, sequence_parallel, cp_impl, cp_sharding, units, recompute, init_weights)

    def _build(self, config, state, seed, sequence_parallel, cp_impl, cp_sharding, units, recompute, init_weights):
        state.layout.validate_model(config)
        if cp_impl not in CP_IMPLS:
            raise GptparConfigError(f"cp_impl={cp_impl!r} is unknown; expected one of {CP_IMPLS}")
        tp, cp = state.tp, state.cp
        if cp.size > 1 and config.dropout > 0:
            raise GptparConfigError(
                f"dropout={config.dropout} with cp={cp.size}: attention dropout is not supported under context "
                "parallelism (ring/Ulysses attention never materialises the probabilities); set dropout=0"
            )
        if cp.size > 1 and cp_impl == "ulysses":
            if (config.n_head // tp.size) % cp.size:
                raise GptparConfigError(
                    f"Ulysses needs the heads per tp rank (n_head/tp = {config.n_head}/{tp.size}) divisible by "
                    f"cp={cp.size}"
                )
            kv_local = head_split(config.n_kv_head, tp.size)[0]
            if kv_local % cp.size and cp.size % kv_local:
                raise GptparConfigError(
                    f"Ulysses with {kv_local} K/V head(s) per tp rank (n_kv_head={config.n_kv_head}, tp={tp.size}) "
                    f"and cp={cp.size}: cp must divide them or be a multiple of them (K/V heads then replicated)"
                )
        self.recompute = recompute
        seq_shards(config.seq_len, cp.size, cp_sharding, tp.size if sequence_parallel else 1)  # validates now
        n_units = config.n_layer + 2
        a, b = units if units is not None else (0, n_units)
        if not 0 <= a < b <= n_units:
            raise GptparConfigError(
                f"units={units} is not a non-empty range within 0..{n_units} (embedding, layers, head)"
            )
        self.units = (a, b)
        self.has_embedding, self.has_head = a == 0, b == n_units
        self.config, self.state, self.tp, self.cp = config, state, tp, cp
        self.sequence_parallel = sequence_parallel and tp.size > 1
        self.cp_sharding = cp_sharding
        seed = state.seed_for("params") if seed is None else seed
        self.rng = TPRngTracker(state.seed_for("tp_local"), state.device) if config.dropout > 0 else None
        if config.dropout > 0:
            check_same_default_rng(tp, state.device)  # replicated activations need identical masks
        sp = self.sequence_parallel
        if self.has_embedding:
            self.wte = VocabParallelEmbedding(config.padded_vocab, config.d_model, group=tp, sequence_parallel=sp)
            if config.position == "learned":
                self.wpe = nn.Embedding(config.seq_len, config.d_model)
            self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleDict(
            {
                str(i): ParallelBlock(config, state, self.rng, sp, cp_impl)
                for i in range(max(a, 1) - 1, min(b, n_units - 1) - 1)
            }
        )
        if self.has_head:
            self.ln_f = make_norm(config, fused=True)
            self.lm_head = ColumnParallelLinear(  # takes [b, s', h]: see head()
                config.d_model, config.padded_vocab, bias=False, group=tp, sequence_parallel=sp, seq_dim=1
            )
            if config.tie_embeddings and self.has_embedding:
                self.lm_head.weight = self.wte.weight  # both [V/tp, h], split the same way
            elif config.tie_embeddings:
                self.lm_head.weight.pipeline_tied_copy = True  # the second copy: count it once in norms
        if init_weights:
            init_gpt_weights(self, config, seed, tp.size, tp.rank)
        if sp:  # parameters used on this rank's tokens only: all-reduce their gradients over tp
            if self.has_embedding and config.position == "learned":
                mark_sequence_parallel(self.wpe.weight, tp)
            for m in self.modules():
                if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                    for prm in m.parameters():
                        mark_sequence_parallel(prm, tp)
        self.to(state.device)

    def tied_parameters(self) -> list[nn.Parameter]:
        """The copies of the tied embedding that live on pipeline stages (first and/or last), if split."""
        if not self.config.tie_embeddings or (self.has_embedding and self.has_head):
            return []
        return ([self.wte.weight] if self.has_embedding else []) + ([self.lm_head.weight] if self.has_head else [])

    def local_positions(self, seq_len: int) -> torch.Tensor:
        """Global positions of the tokens this cp rank holds, in local order."""
        return self._shards(seq_len)[self.cp.rank].positions()

    def _shards(self, seq_len: int) -> list[SeqShard]:
        return seq_shards(seq_len, self.cp.size, self.cp_sharding, self.tp.size if self.sequence_parallel else 1)

    def hidden_shape(self, batch: int, seq_len: int) -> tuple[int, int, int]:
        """Shape of the hidden state between pipeline stages on this rank: ``[s', b, h]``."""
        local = seq_len // self.cp.size // (self.tp.size if self.sequence_parallel else 1)
        return (local, batch, self.config.d_model)

    def embed(self, idx: torch.Tensor, doc_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``idx [b, s]`` -> hidden ``[s', b, h]`` for this rank's tokens (``doc_pos [s, b]``: positions
        within packed documents)."""
        check_sequence(idx, self.config)
        pos = self._shards(idx.shape[1])[self.cp.rank].positions(idx.device)
        if self.cp.size > 1:
            idx = idx.index_select(1, pos)
        x = self.wte(idx.t())  # [s', b, h]; reduce-scattered along s with SP
        if self.config.position == "learned":
            if doc_pos is not None:
                pos = doc_pos.index_select(0, pos.to(doc_pos.device))  # this cp rank's, within their documents
            if self.sequence_parallel:
                n = x.shape[0]
                pos = pos[self.tp.rank * n : (self.tp.rank + 1) * n]
            x = x + (self.wpe(pos) if doc_pos is not None else self.wpe(pos).unsqueeze(1))
        return sharded_dropout(self.drop, x, self.rng, self.sequence_parallel)

    def head(
        self,
        x: torch.Tensor,
        targets: torch.Tensor | None,
        seq_len: int,
        ignore_index: int = -100,
        loss_normalizer: torch.Tensor | float | None = None,
    ):
        """Hidden ``[s', b, h]`` -> ``(logits [b, s/cp, V/tp], loss | None)``: the sum of the valid tokens'
        losses (over cp too) divided by their count, or by ``loss_normalizer`` when given (a count over more
        tokens than this call sees: micro-batches, dp ranks). Padded vocabulary columns
        (``>= vocab_size``) hold -inf: out of the softmax, the loss and sampling."""
        # batch-major before the LM head: the logits (and their gradient, the step's largest tensors) are
        # then contiguous, with no [b, s, V/tp] copy in backward; the transpose copies only [s, b, h]
        logits = self.lm_head(self.ln_f(x).transpose(0, 1))
        local = logits.shape[-1]
        first_padded = self.config.vocab_size - self.tp.rank * local  # local index of the first padded column
        if first_padded < local:
            pad = torch.arange(local, device=logits.device) >= first_padded
            logits = logits.masked_fill(pad, float("-inf"))
        if targets is None:
            return logits, None
        if self.cp.size > 1:
            targets = targets.index_select(1, self._shards(seq_len)[self.cp.rank].positions(targets.device))
        per_token = vocab_parallel_cross_entropy(logits, targets, self.tp, ignore_index)
        total = comm.reduce_from_region(per_token.sum(), self.cp)  # global sum; gradient 1 per rank
        if loss_normalizer is not None:
            return logits, total / loss_normalizer
        count = (targets != ignore_index).sum().to(per_token.dtype)
        count = comm.all_reduce(count.clone(), self.cp)
        return logits, total / count.clamp(min=1)

    def _flash_documents(self, doc_ids: torch.Tensor) -> bool:
        """Whether one-rank attention runs the flash kernel with document ids (Triton on, a head size it
        takes, no attention dropout) rather than SDPA with a dense mask."""
        from gptpar.ops.attention import flash_kernel_applies

        dropout = self.training and self.config.dropout > 0.0
        return not dropout and flash_kernel_applies(doc_ids, self.config.head_dim)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
        loss_normalizer: torch.Tensor | float | None = None,
        doc_ids: torch.Tensor | None = None,
    ):
        """``doc_ids [b, s]`` (every pipeline stage gets them): packed documents, non-decreasing along s;
        attention stops at their boundaries and positions restart at each (as :class:`GPT`)."""
        doc_pos = doc_mask = None
        if doc_ids is not None:
            from gptpar.ops.attention import document_mask, document_positions

            doc_ids = doc_ids.to(self.state.device)
            doc_pos = document_positions(doc_ids).t()  # [s, b], the whole sequence's
            # one rank holds the whole sequence: the flash kernel takes the ids (it skips the blocks where
            # documents do not meet), else an SDPA mask [b, 1, s, s]; cp > 1: ring/Ulysses take the ids
            if self.cp.size == 1 and not self._flash_documents(doc_ids):
                doc_mask = document_mask(doc_ids)
        if self.has_embedding:
            seq_len = idx.shape[1]
            if doc_ids is not None:
                from gptpar.ops.attention import check_documents

                check_documents(doc_ids, idx)
            x = self.embed(idx, doc_pos)
        else:  # a later pipeline stage: idx is the hidden state [s', b, h]
            x = idx
            seq_len = x.shape[0] * self.cp.size * (self.tp.size if self.sequence_parallel else 1)
        shards = self._shards(seq_len)
        # rotary tables at this rank's tokens' global positions (the whole cp shard: SP gathers it first), or
        # at their positions within their documents
        positions = shards[self.cp.rank].positions(self.state.device)
        if doc_pos is not None:
            positions = doc_pos.index_select(0, positions)
        rope = rope_for(self.config, positions, self.state.device) if self.blocks else None
        for block in self.blocks.values():
            block.attn.shards, block.attn.rope = shards, rope
            block.attn.doc_mask, block.attn.doc_ids = doc_mask, doc_ids
            if self.recompute and self.training and torch.is_grad_enabled():
                # Full-layer recomputation: keep only each block's input; the backward re-runs the block
                # (its collectives included, in the same order on every rank).
                # Dropout replays: checkpoint restores the default generator, the tracker its own stream.
                replay = {"context_fn": self.rng.checkpoint_contexts} if self.rng is not None else {}
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **replay)
            else:
                x = block(x)
        if not self.has_head:
            return x
        return self.head(x, targets, seq_len, ignore_index, loss_normalizer)


# ---------------------------------------------------------------------------------------------- state dicts
def tp_layout(name: str, config: GPTConfig) -> tuple[int | None, object]:
    """The tensor-parallel spec ``(dim, chunks)`` ParallelGPT gives parameter ``name`` (reference names)."""
    if name in ("wte.weight", "lm_head.weight"):
        return 0, 1
    leaf = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
        return 0, config.qkv_chunks
    if leaf in ("mlp.fc.weight", "mlp.fc.bias"):
        return 0, 2 if config.activation == "swiglu" else 1
    if leaf in ("attn.proj.weight", "mlp.proj.weight"):
        return 1, 1
    return None, 1


def full_param_specs(config: GPTConfig) -> dict[str, tuple[tuple[int, ...], int | None, object]]:
    """``name -> (full shape, tp dim, chunks)`` of every ParallelGPT parameter (tied names included), with no
    process group and no memory (a meta-device reference model): what a loader needs to read any rank's
    slices."""
    from gptpar.models.gpt import GPT

    with torch.device("meta"):
        ref = GPT(config, init_weights=False)
    return {n: (tuple(p.shape), *tp_layout(n, config)) for n, p in ref.named_parameters(remove_duplicate=False)}


def _specs(model: nn.Module) -> dict[str, tuple[int | None, int]]:
    # remove_duplicate=False: a tied weight appears under both of its names, as in state_dict().
    return {n: tp_spec(p) for n, p in model.named_parameters(remove_duplicate=False)}


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """This tp rank's state dict for ``model`` from a full (reference) state dict."""
    specs = _specs(model)
    missing = sorted(set(model.state_dict()) - set(full))
    if missing:
        raise KeyError(f"full state dict lacks {missing}")
    return {k: shard_tensor(full[k], *specs.get(k, (None, 1)), group.size, group.rank) for k in model.state_dict()}


def gather_full(t: torch.Tensor, spec: tuple[int | None, int], group: Group) -> torch.Tensor:
    """The full tensor from every tp rank's piece ``t`` under ``spec``. Collective: one all-gather if sharded."""
    dim, chunks = spec
    if dim is None or group.size == 1:
        return t.detach().clone()
    pieces = comm.all_gather(t.detach(), group, dim=dim).chunk(group.size, dim=dim)
    return unshard_tensor(list(pieces), dim, chunks)


@torch.no_grad()
def gather_state_dict(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """The full (reference-shaped) state dict, gathered over tp."""
    specs = _specs(model)
    return {k: gather_full(v, specs.get(k, (None, 1)), group) for k, v in model.state_dict().items()}


@torch.no_grad()
def gather_grads(model: nn.Module, group: Group) -> dict[str, torch.Tensor]:
    """Full gradients by parameter name (reference layout), gathered over tp; zeros where a grad is None."""
    return {
        name: gather_full(p.grad if p.grad is not None else torch.zeros_like(p), tp_spec(p), group)
        for name, p in model.named_parameters()
    }
