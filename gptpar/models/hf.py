"""Hugging Face transformers models in and out of gptpar, at any layout, one tensor at a time.

Architectures: ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM``. A config field gptpar does not implement (sliding-window attention, an unknown RoPE
scaling type, another activation, ...) is refused with its name, never ignored; so is a weight file that
lacks a tensor, holds one of the wrong shape or one gptpar would not use.

* :func:`config_from_hf` / :func:`hf_config_from_gptpar` — configs both ways;
* :func:`hf_sources` — which transformers tensors make up each gptpar parameter (q|k|v and gate|up are
  fused in gptpar; GPT-2's Conv1D weights are transposed);
* :class:`HFWeights` — a model directory's safetensors (one file or an index), read by slices:
  :func:`read_shard` reads only the rows/columns one tensor-parallel rank holds (``safe_open.get_slice``),
  so a rank's host memory stays near its shard plus one slice;
* :func:`from_hf` — a :class:`~gptpar.models.parallel_gpt.ParallelGPT` (or a pipeline stage of it) with a
  directory's weights; :func:`to_hf` (and :func:`gptpar.checkpoint.export_checkpoint`) — a directory that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads with no missing or unexpected keys, written
  with :class:`SafetensorsWriter` one tensor at a time in files of at most ``max_shard_bytes``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import torch
import torch.nn as nn

from gptpar.errors import GptparConfigError
from gptpar.models.gpt import GPTConfig
from gptpar.sharding import shard_tensor

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ARCHITECTURES = ("GPT2LMHeadModel",) + LLAMA_FAMILY
MODEL_TYPES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# tensors some checkpoints carry that are not weights (GPT-2's causal-mask buffers, old Llama's inv_freq)
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default: files of at most 5 GB


def _get(cfg, name, default=None):
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def architecture(hf_config) -> str:
    archs = _get(hf_config, "architectures") or []
    model_type = _get(hf_config, "model_type")
    by_type = {v: k for k, v in MODEL_TYPES.items()}
    arch = archs[0] if archs else by_type.get(model_type)
    if arch not in ARCHITECTURES:
        raise GptparConfigError(
            f"architecture {arch or model_type!r} is not supported; expected one of {ARCHITECTURES}"
        )
    return arch


def _rope(hf_config) -> tuple[float, dict | None]:
    params = dict(_get(hf_config, "rope_parameters") or _get(hf_config, "rope_scaling") or {})
    theta = float(params.pop("rope_theta", _get(hf_config, "rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise GptparConfigError(f"rope scaling type {kind!r} is not supported (only Llama 3's 'llama3', or none)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    extra = sorted(set(params) - set(keys))
    if extra:
        raise GptparConfigError(f"rope scaling fields {extra} are not supported")
    return theta, {k: params[k] for k in keys}


def config_from_hf(hf_config, **overrides) -> GPTConfig:
    """The :class:`GPTConfig` of a transformers config (object or config.json dict)."""
    arch = architecture(hf_config)
    g = lambda n, d=None: _get(hf_config, n, d)  # noqa: E731
    if arch == "GPT2LMHeadModel":
        if g("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise GptparConfigError(f"activation_function={g('activation_function')!r} is not supported (tanh GeLU)")
        for name in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if g(name, False):
                raise GptparConfigError(f"GPT-2 config field {name}=True is not supported")
        if not g("scale_attn_weights", True):
            raise GptparConfigError("GPT-2 config field scale_attn_weights=False is not supported")
        cfg = dict(
            vocab_size=g("vocab_size"),
            seq_len=g("n_positions"),
            n_layer=g("n_layer"),
            n_head=g("n_head"),
            d_model=g("n_embd"),
            ffn_hidden=g("n_inner") or 4 * g("n_embd"),
            norm_eps=g("layer_norm_epsilon"),
            tie_embeddings=bool(g("tie_word_embeddings", True)),
            init_std=g("initializer_range", 0.02),
        )
        return GPTConfig(**{**cfg, **overrides})
    if g("hidden_act", "silu") != "silu":
        raise GptparConfigError(f"hidden_act={g('hidden_act')!r} is not supported (SwiGLU with silu)")
    if g("sliding_window") is not None and (arch == "MistralForCausalLM" or g("use_sliding_window", False)):
        raise GptparConfigError(f"sliding_window={g('sliding_window')} is not supported (full causal attention only)")
    if g("mlp_bias", False):
        raise GptparConfigError("mlp_bias=True is not supported")
    for name in ("attention_dropout", "hidden_dropout"):
        if g(name, 0.0):
            raise GptparConfigError(f"{name}={g(name)} is not supported (gptpar's dropout is one rate for all)")
    if g("pretraining_tp", 1) != 1:
        raise GptparConfigError(f"pretraining_tp={g('pretraining_tp')} is not supported")
    qkv_bias = arch == "Qwen2ForCausalLM"
    if g("attention_bias", False):
        if arch == "LlamaForCausalLM":
            raise GptparConfigError("attention_bias=True (bias on o_proj but not the MLP) is not supported")
        qkv_bias = True
    theta, scaling = _rope(hf_config)
    heads = g("num_attention_heads")
    cfg = dict(
        vocab_size=g("vocab_size"),
        seq_len=g("max_position_embeddings"),
        n_layer=g("num_hidden_layers"),
        n_head=heads,
        n_kv_head=g("num_key_value_heads") or heads,
        d_model=g("hidden_size"),
        ffn_hidden=g("intermediate_size"),
        head_dim=g("head_dim") or g("hidden_size") // heads,
        norm_eps=g("rms_norm_eps"),
        tie_embeddings=bool(g("tie_word_embeddings", False)),
        position="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        activation="swiglu",
        norm="rmsnorm",
        bias=False,
        qkv_bias=qkv_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        init_std=g("initializer_range", 0.02),
    )
    return GPTConfig(**{**cfg, **overrides})


def architecture_of(config: GPTConfig) -> str:
    """The transformers architecture that computes what ``config`` computes (refused when none does)."""
    gpt2 = dict(
        position="learned",
        norm="layernorm",
        activation="gelu",
        bias=True,
        tie_embeddings=True,
        qk_norm=False,
        qkv_bias=True,
    )
    if all(getattr(config, k) == v for k, v in gpt2.items()) and config.n_kv_head == config.n_head:
        return "GPT2LMHeadModel"
    llama = dict(position="rope", norm="rmsnorm", activation="swiglu", bias=False)
    if all(getattr(config, k) == v for k, v in llama.items()):
        if config.qk_norm:
            return "Qwen3ForCausalLM"
        return "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    raise GptparConfigError(
        "this model matches no transformers architecture gptpar exports (GPT-2: learned positions, LayerNorm, GeLU, "
        "biases, tied; Llama/Qwen2/Qwen3: rope, RMSNorm, SwiGLU, no bias)"
    )


def hf_config_from_gptpar(config: GPTConfig, dtype: torch.dtype = torch.float32, base: dict | None = None) -> dict:
    """A config.json for ``config`` (``base``: the original config.json to keep its other fields, e.g.
    token ids)."""
    arch = architecture_of(config)
    out = dict(base or {})
    out.update(
        {
            "architectures": [arch],
            "model_type": MODEL_TYPES[arch],
            "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_embeddings,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "dtype": str(dtype).removeprefix("torch."),
            "initializer_range": config.init_std,
        }
    )
    if arch == "GPT2LMHeadModel":
        out.update(
            {
                "n_positions": config.seq_len,
                "n_layer": config.n_layer,
                "n_head": config.n_head,
                "n_embd": config.d_model,
                "n_inner": config.ffn_hidden,
                "layer_norm_epsilon": config.norm_eps,
                "activation_function": "gelu_new",
                "n_ctx": config.seq_len,
            }
        )
        return out
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, **config.rope_scaling}
    out.pop("rope_scaling", None)
    out.update(
        {
            "max_position_embeddings": config.seq_len,
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head,
            "hidden_size": config.d_model,
            "intermediate_size": config.ffn_hidden,
            "head_dim": config.head_dim,
            "rms_norm_eps": config.norm_eps,
            "hidden_act": "silu",
            "rope_theta": config.rope_theta,
            "rope_parameters": rope,
            "attention_bias": bool(config.qkv_bias and arch != "Qwen2ForCausalLM"),
            "mlp_bias": False,
        }
    )
    if arch != "LlamaForCausalLM":
        out.update({"use_sliding_window": False, "sliding_window": None})
    return out


# ---------------------------------------------------------------------------------------------- names
def hf_sources(config: GPTConfig, arch: str) -> dict[str, list[tuple[str, bool]]]:
    """gptpar parameter name -> the transformers tensors concatenated along dim 0 to make it, each with
    whether it is stored transposed (GPT-2's Conv1D keeps ``[in, out]``). A tied ``lm_head.weight`` is the
    embedding's."""
    src: dict[str, list[tuple[str, bool]]] = {}
    if arch == "GPT2LMHeadModel":
        t = "transformer."
        src.update(
            {
                "wte.weight": [(t + "wte.weight", False)],
                "wpe.weight": [(t + "wpe.weight", False)],
                "ln_f.weight": [(t + "ln_f.weight", False)],
                "ln_f.bias": [(t + "ln_f.bias", False)],
            }
        )
        for i in range(config.n_layer):
            p, q = f"{t}h.{i}.", f"blocks.{i}."
            for a, b, tr in (
                ("ln_1", "ln_1", False),
                ("ln_2", "ln_2", False),
                ("attn.c_attn", "attn.qkv", True),
                ("attn.c_proj", "attn.proj", True),
                ("mlp.c_fc", "mlp.fc", True),
                ("mlp.c_proj", "mlp.proj", True),
            ):
                src[f"{q}{b}.weight"] = [(f"{p}{a}.weight", tr)]
                src[f"{q}{b}.bias"] = [(f"{p}{a}.bias", False)]
    else:
        src.update(
            {"wte.weight": [("model.embed_tokens.weight", False)], "ln_f.weight": [("model.norm.weight", False)]}
        )
        for i in range(config.n_layer):
            p, q = f"model.layers.{i}.", f"blocks.{i}."
            a = p + "self_attn."
            src[q + "ln_1.weight"] = [(p + "input_layernorm.weight", False)]
            src[q + "ln_2.weight"] = [(p + "post_attention_layernorm.weight", False)]
            src[q + "attn.qkv.weight"] = [(a + f"{x}_proj.weight", False) for x in "qkv"]
            if config.qkv_bias:
                src[q + "attn.qkv.bias"] = [(a + f"{x}_proj.bias", False) for x in "qkv"]
            src[q + "attn.proj.weight"] = [(a + "o_proj.weight", False)]
            if config.qk_norm:
                src[q + "attn.q_norm.weight"] = [(a + "q_norm.weight", False)]
                src[q + "attn.k_norm.weight"] = [(a + "k_norm.weight", False)]
            src[q + "mlp.fc.weight"] = [(p + "mlp.gate_proj.weight", False), (p + "mlp.up_proj.weight", False)]
            src[q + "mlp.proj.weight"] = [(p + "mlp.down_proj.weight", False)]
    src["lm_head.weight"] = src["wte.weight"] if config.tie_embeddings else [("lm_head.weight", False)]
    return src


def _piece_rows(config: GPTConfig, name: str, pieces) -> list[int]:
    """Rows (gptpar orientation) of each source piece of parameter ``name``."""
    c = config
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        return [c.q_size, c.kv_size, c.kv_size] if len(pieces) == 3 else [c.q_size + 2 * c.kv_size]
    if name.endswith("mlp.fc.weight") and len(pieces) == 2:
        return [c.ffn_hidden, c.ffn_hidden]
    return [-1]  # one piece: all rows


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: GPTConfig, arch: str) -> dict[str, torch.Tensor]:
    """gptpar's (reference-layout) state dict from a transformers model's ``state_dict()`` (in memory).
    Vocabulary rows are padded to ``config.padded_vocab`` with zeros."""
    out = {}
    for name, pieces in hf_sources(config, arch).items():
        full = torch.cat([sd[n].t() if tr else sd[n] for n, tr in pieces])
        out[name] = _pad_vocab(name, full, config)
    return out


def _pad_vocab(name: str, t: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    if name in ("wte.weight", "lm_head.weight") and t.shape[0] < config.padded_vocab:
        t = torch.cat([t, t.new_zeros(config.padded_vocab - t.shape[0], *t.shape[1:])])
    return t.contiguous()


# ---------------------------------------------------------------------------------------------- reading
_ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _StoredTensor:
    """One tensor of a safetensors file, read by ``pread`` of just the bytes a slice needs (no memory map:
    a rank's resident memory is what it keeps, not every page it looked at)."""

    def __init__(self, fd: int, path: str, name: str, entry: dict, data_start: int) -> None:
        self.fd, self.path, self.name = fd, path, name
        self.dtype = _ST_DTYPES.get(entry["dtype"])
        if self.dtype is None:
            raise GptparConfigError(f"{path!r}: tensor {name!r} has dtype {entry['dtype']}, not one gptpar reads")
        self.shape = tuple(entry["shape"])
        self.start = data_start + entry["data_offsets"][0]
        self.item = torch.tensor([], dtype=self.dtype).element_size()

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def _pread(self, offset: int, nbytes: int) -> torch.Tensor:
        buf = bytearray(nbytes)
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = os.preadv(self.fd, [view[got:]], self.start + offset + got)
            if n == 0:
                raise GptparConfigError(f"{self.path!r} is truncated: tensor {self.name!r} ends past the file's end")
            got += n
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype) if nbytes else torch.empty(0, dtype=self.dtype)

    def read(self, rows: tuple[int, int], cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows ``[a, b)`` (and columns ``[c, d)`` of a matrix), in chunks of at most ~16 MB."""
        a, b = rows
        if len(self.shape) == 1:
            return self._pread(a * self.item, (b - a) * self.item).clone()
        width = self.shape[1]
        c, d = cols if cols is not None else (0, width)
        row_bytes = width * self.item
        if (c, d) == (0, width):
            return self._pread(a * row_bytes, (b - a) * row_bytes).view(b - a, width)
        out = torch.empty(b - a, d - c, dtype=self.dtype)
        step = max(1, (16 << 20) // row_bytes)
        for r in range(a, b, step):
            e = min(b, r + step)
            out[r - a : e - a] = self._pread(r * row_bytes, (e - r) * row_bytes).view(e - r, width)[:, c:d]
        return out


class HFWeights:
    """The safetensors of a transformers model directory (one file or an index), opened lazily; every
    problem (missing, truncated, corrupt, lacking a tensor) names the file."""

    def __init__(self, path: str) -> None:
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise GptparConfigError(f"{path!r} is not a directory (expected a transformers model directory)")
        if not os.path.exists(cfg_path):
            raise GptparConfigError(f"{cfg_path!r} is missing: not a transformers model directory")
        try:
            with open(cfg_path) as f:
                self.config = json.load(f)
        except json.JSONDecodeError as e:
            raise GptparConfigError(f"{cfg_path!r} is not valid JSON: {e}") from None
        self._headers: dict[str, tuple[int, dict, int]] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self.files = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError) as e:
                raise GptparConfigError(f"{index!r} is not a safetensors index ({e})") from None
        elif os.path.exists(os.path.join(path, "model.safetensors")):
            self.files = {n: "model.safetensors" for n in self._header("model.safetensors")[1]}
        else:
            raise GptparConfigError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json")

    def _header(self, file: str) -> tuple[int, dict, int]:
        if file not in self._headers:
            full = os.path.join(self.path, file)
            if not os.path.exists(full):
                raise GptparConfigError(f"{full!r} is missing (listed in the model's index)")
            fd = os.open(full, os.O_RDONLY)
            size = os.fstat(fd).st_size
            try:
                (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(os.pread(fd, n, 8))
                header.pop("__metadata__", None)
                end = max((e["data_offsets"][1] for e in header.values()), default=0)
                if 8 + n + end > size:
                    raise ValueError(f"its tensors need {8 + n + end} bytes, the file has {size} (truncated)")
            except (struct.error, ValueError, KeyError, TypeError) as e:
                os.close(fd)
                raise GptparConfigError(f"{full!r} cannot be read as safetensors: {e}") from None
            self._headers[file] = (fd, header, 8 + n)
        return self._headers[file]

    def slice(self, name: str) -> _StoredTensor:
        if name not in self.files:
            raise GptparConfigError(f"{self.path!r} has no tensor {name!r}")
        file = self.files[name]
        fd, header, start = self._header(file)
        if name not in header:
            raise GptparConfigError(f"{os.path.join(self.path, file)!r} lacks tensor {name!r} (listed in the index)")
        return _StoredTensor(fd, os.path.join(self.path, file), name, header[name], start)

    def close(self) -> None:
        for fd, _, _ in self._headers.values():
            os.close(fd)
        self._headers.clear()


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """``[a, b)`` runs of consecutive values in a 1-D index (ascending within runs)."""
    runs, start, prev = [], None, None
    for i in index.tolist():
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            runs.append((start, prev + 1))
            start = prev = i
    if start is not None:
        runs.append((start, prev + 1))
    return runs


def _read_rows(weights: HFWeights, pieces, piece_rows, rows: list[tuple[int, int]], cols, shape, name, config):
    """Rows ``rows`` (gptpar orientation, runs) and columns ``cols`` (a run, or None: all) of the parameter
    made of ``pieces``; rows past the pieces (padded vocabulary) are zeros."""
    out, at = [], 0
    bounds = []
    for (hf_name, tr), n in zip(pieces, piece_rows, strict=True):
        sl = weights.slice(hf_name)
        hf_shape = tuple(sl.get_shape())
        g_shape = hf_shape[::-1] if tr else hf_shape
        n = g_shape[0] if n == -1 else n
        want = (n,) + tuple(shape[1:])
        if name in ("wte.weight", "lm_head.weight"):
            want = (config.vocab_size,) + tuple(shape[1:])
        if g_shape != want:
            raise GptparConfigError(
                f"{weights.path!r}: tensor {hf_name!r} has shape {hf_shape}, expected {want[::-1] if tr else want} "
                f"for gptpar's {name} under the model's config.json"
            )
        bounds.append((at, at + g_shape[0], sl, tr))
        at += g_shape[0]
    for a, b in rows:
        for lo, hi, sl, tr in bounds:
            s, e = max(a, lo), min(b, hi)
            if s >= e:
                continue
            if len(shape) == 1:
                out.append(sl.read((s - lo, e - lo)))
            elif tr:  # stored [in, out]: gptpar rows are stored columns, gptpar columns stored rows
                out.append(sl.read(cols or (0, shape[1]), (s - lo, e - lo)).t())
            else:
                out.append(sl.read((s - lo, e - lo), cols))
        if b > at:  # padded vocabulary rows
            n = b - max(a, at)
            width = () if len(shape) == 1 else ((cols[1] - cols[0]) if cols else shape[1],)
            out.append(torch.zeros((n,) + width, dtype=out[-1].dtype if out else torch.float32))
    return torch.cat(out) if len(out) > 1 else out[0]


def read_shard(
    weights: HFWeights,
    config: GPTConfig,
    arch: str,
    specs: dict,
    tp_size: int,
    tp_rank: int,
    into: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """This tp rank's piece of every parameter in ``specs`` (``name -> (full shape, tp dim, chunks)``), read
    slice by slice. With ``into`` (name -> this rank's parameter), each piece is copied into it as soon as
    it is read, so only one piece is held beyond the parameters."""
    sources = hf_sources(config, arch)
    used = {n for pieces in sources.values() for n, _ in pieces}
    unknown = sorted(n for n in weights.files if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        raise GptparConfigError(
            f"{weights.path!r} holds tensors gptpar would not use: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
            "(a model with parts gptpar does not implement?)"
        )
    out = {}
    for name, (shape, dim, chunks) in specs.items():
        if name not in sources:
            raise GptparConfigError(f"no transformers source for gptpar parameter {name!r}")
        pieces = sources[name]
        piece_rows = _piece_rows(config, name, pieces)
        if dim is None or tp_size == 1:
            rows, cols = [(0, shape[0])], None
        elif dim == 0:
            rows, cols = _runs(shard_tensor(torch.arange(shape[0]), 0, chunks, tp_size, tp_rank)), None
        else:
            (cols,) = _runs(shard_tensor(torch.arange(shape[1]), 0, chunks, tp_size, tp_rank))
            rows = [(0, shape[0])]
        t = _read_rows(weights, pieces, piece_rows, rows, cols, shape, name, config)
        if into is not None:
            with torch.no_grad():
                into[name].copy_(t)
        else:
            out[name] = t
    return out


def param_specs(model: nn.Module, tp_size: int) -> dict[str, tuple[tuple[int, ...], int | None, object]]:
    """``name -> (full shape, tp dim, chunks)`` of a (parallel) model's parameters, tied names included."""
    from gptpar.sharding import full_length, tp_spec

    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        dim, chunks = tp_spec(p)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] = full_length(shape[dim], chunks, tp_size)
        out[n] = (tuple(shape), dim, chunks)
    return out


def source_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise GptparConfigError(f"config.json dtype {name!r} is not a floating-point torch dtype")
    return dt


def from_hf(path: str, state, *, vocab_multiple: int = 128, dtype: torch.dtype | None = None, **options):
    """A :class:`~gptpar.models.parallel_gpt.ParallelGPT` (``options``: its keyword arguments, e.g.
    ``sequence_parallel``, ``units`` for a pipeline stage) holding the weights of the transformers model
    directory ``path``. Each rank reads only its own slices. ``dtype``: the parameters' dtype (default
    fp32, gptpar's master weights; the checkpoint's own dtype is kept for :func:`to_hf`)."""
    from gptpar.models.parallel_gpt import ParallelGPT

    weights = HFWeights(path)
    arch = architecture(weights.config)
    config = config_from_hf(weights.config, vocab_multiple=vocab_multiple)
    model = ParallelGPT(config, state, init_weights=False, **options)
    if dtype is not None:
        model.to(dtype)
    load_hf_weights(model, weights, state)
    model.hf = {"architecture": arch, "config": weights.config, "path": path}
    return model


def load_hf_weights(model: nn.Module, weights: HFWeights, state) -> None:
    """Fill every parameter of ``model`` (this rank's pieces) from ``weights``, slice by slice."""
    arch = architecture(weights.config)
    config = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    read_shard(weights, config, arch, param_specs(model, state.tp.size), state.tp.size, state.tp.rank, into=params)


# ---------------------------------------------------------------------------------------------- writing
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class SafetensorsWriter:
    """Writes a safetensors file whose tensors' names, shapes and dtype are known up front, one tensor at a
    time (the header first, then each tensor's bytes as it comes), so no whole model is ever held."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, metadata=None):
        self.path, self.dtype, self.order = path, dtype, [n for n, _ in entries]
        size = torch.tensor([], dtype=dtype).element_size()
        header, at = {}, 0
        for n, shape in entries:
            nbytes = size * int(torch.Size(shape).numel())
            header[n] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [at, at + nbytes]}
            at += nbytes
        header["__metadata__"] = {"format": "pt", **(metadata or {})}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.shapes = {n: tuple(s) for n, s in entries}
        self.file = open(path + ".part", "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        if name != self.order[self.next] or tuple(t.shape) != self.shapes[name]:
            raise RuntimeError(f"safetensors writer: got {name} {tuple(t.shape)}, expected {self.order[self.next]}")
        self.file.write(t.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"safetensors writer: {len(self.order) - self.next} tensors were never written")
        self.file.close()
        os.replace(self.path + ".part", self.path)


def hf_tensors_of(config: GPTConfig, arch: str, name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The transformers tensors of one full (gathered) gptpar parameter: q|k|v and gate|up split, Conv1D
    transposed back, padded vocabulary rows dropped; ``[]`` for a tied output layer."""
    if name == "lm_head.weight" and config.tie_embeddings:
        return []
    pieces = hf_sources(config, arch)[name]
    if name in ("wte.weight", "lm_head.weight"):
        full = full[: config.vocab_size]
    sizes = _piece_rows(config, name, pieces)
    parts = full.split(sizes) if sizes != [-1] else [full]
    return [(n, p.t() if tr else p) for (n, tr), p in zip(pieces, parts, strict=True)]


def hf_shapes(config: GPTConfig, arch: str) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """gptpar name -> [(transformers name, shape)] without any tensor (for writing headers first)."""
    from gptpar.models.gpt import GPT

    with torch.device("meta"):
        ref = GPT(config, init_weights=False)
    out = {}
    for name, p in ref.named_parameters(remove_duplicate=False):
        out[name] = [(n, tuple(t.shape)) for n, t in hf_tensors_of(config, arch, name, p)]
    return out


def write_hf_dir(
    out: str,
    config: GPTConfig,
    tensors,
    *,
    dtype: torch.dtype,
    base_config: dict | None = None,
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """A transformers model directory from ``tensors``: an iterable of ``(gptpar name, full tensor)`` in
    :func:`hf_shapes` order (each consumed and dropped as it comes). Written into ``out.tmp`` and renamed."""
    if os.path.exists(out) and not overwrite:
        raise GptparConfigError(f"{out!r} exists: refusing to overwrite it (pass overwrite)")
    arch = architecture_of(config)
    shapes = hf_shapes(config, arch)
    size = torch.tensor([], dtype=dtype).element_size()
    files: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for entries in shapes.values():
        for n, shape in entries:
            nbytes = size * int(torch.Size(shape).numel())
            if files[-1] and used + nbytes > max_shard_bytes:
                files.append([])
                used = 0
            files[-1].append((n, shape))
            used += nbytes
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        names = (
            ["model.safetensors"]
            if len(files) == 1
            else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        )
        writers = [
            SafetensorsWriter(os.path.join(tmp, fn), entries, dtype) for fn, entries in zip(names, files, strict=True)
        ]
        where = {n: w for w, entries in zip(writers, files, strict=True) for n, _ in entries}
        for name, full in tensors:
            for n, t in hf_tensors_of(config, arch, name, full):
                where[n].write(n, t)
        for w in writers:
            w.close()
        if len(files) > 1:
            total = sum(size * int(torch.Size(s).numel()) for entries in files for _, s in entries)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {n: fn for fn, entries in zip(names, files, strict=True) for n, _ in entries},
            }
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=1)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_from_gptpar(config, dtype, base_config), f, indent=1)
        if tokenizer_dir:
            for fn in TOKENIZER_FILES:
                if os.path.exists(os.path.join(tokenizer_dir, fn)):
                    shutil.copy(os.path.join(tokenizer_dir, fn), os.path.join(tmp, fn))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no stray files from a failed export
        raise


def to_hf(model: nn.Module, state, path: str, *, dtype: torch.dtype | None = None, **kw) -> None:
    """Write a live (tensor-parallel) model as a transformers directory. Collective over the tp group: one
    parameter at a time is gathered (never the whole model on one rank) and rank 0 writes it. Pipeline
    stages: pass the whole-model ``model`` on a pp=1 layout, or save a checkpoint and
    :func:`gptpar.checkpoint.export_checkpoint` it."""
    from gptpar.models.parallel_gpt import gather_full
    from gptpar.sharding import tp_spec

    if state.pp.size > 1:
        raise GptparConfigError("to_hf needs the whole model on each pipeline rank: export a checkpoint instead")
    hf = getattr(model, "hf", {})
    dtype = dtype or (source_dtype(hf["config"]) if hf else torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    arch = architecture_of(model.config)

    def tensors():
        for name in hf_shapes(model.config, arch):
            full = gather_full(params[name], tp_spec(params[name]), state.tp)  # collective: every tp rank
            if state.rank == 0:
                yield name, full

    if state.rank == 0:
        write_hf_dir(
            path, model.config, tensors(), dtype=dtype, base_config=hf.get("config"), tokenizer_dir=hf.get("path"), **kw
        )
    else:
        for _ in tensors():
            pass
    from gptpar.parallel import comm

    comm.all_reduce(torch.zeros(1, device=state.device), state.world)  # the directory exists on return
