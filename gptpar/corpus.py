"""Training data: text -> tokens -> a memory-mapped uint16 token file -> batches per dp rank.

* Default corpus, no download: the Python standard library's own ``.py`` sources on this machine.
* ``--data PATH``: a text file, a folder of text files (``.txt``, ``.md``, ``.py``, ``.rst``), or a
  pre-tokenised nanoGPT ``.bin`` (uint16 tokens; its vocabulary size must be given).
* Tokeniser: byte-level BPE trained with the ``tokenizers`` package (``bpe``), or raw bytes (``bytes``,
  256 tokens, no training). Tokens are written once under the cache dir, keyed by the corpus and
  tokeniser, with the last 5% held out for validation.
* Batches are a pure function of ``(seed, step, dp rank)``: resuming at step k reads exactly what an
  uninterrupted run would have read, and each dp rank reads its own sequences.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from gptpar.errors import GptparConfigError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
TOKENIZERS = ("bpe", "bytes")


def default_cache_dir() -> str:
    return os.environ.get("GPTPAR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gptpar"))


def stdlib_files(max_bytes: int = 8_000_000) -> list[str]:
    """The standard library's .py files in a fixed order, up to ``max_bytes`` in total."""
    root = os.path.dirname(os.__file__)
    out, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "test", "tests", "__pycache__", "idlelib")
        )
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                out.append(path)
                total += os.path.getsize(path)
                if total >= max_bytes:
                    return out
    return out


def text_files(path: str) -> list[str]:
    """The text files a ``--data`` path names; raises a clear error for a missing or empty source."""
    if not os.path.exists(path):
        raise GptparConfigError(f"--data {path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(TEXT_SUFFIXES))
        if not files:
            raise GptparConfigError(f"--data {path!r} is a folder with no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        files = [path]
    if sum(os.path.getsize(f) for f in files) == 0:
        raise GptparConfigError(f"--data {path!r} is empty: there is no text to train on")
    return files


def _read(files: list[str]) -> str:
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            parts.append(fh.read().decode("utf-8", errors="replace"))
    return "\n".join(parts)


@dataclass
class Corpus:
    """A tokenised corpus: memory-mapped train/val token arrays and how to decode them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer_path: str | None  # tokenizers' JSON for bpe; None for bytes / pre-tokenised

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer_path is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        from tokenizers import Tokenizer

        return Tokenizer.from_file(self.tokenizer_path).decode(ids)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer_path is None:
            return list(text.encode("utf-8"))
        from tokenizers import Tokenizer

        return Tokenizer.from_file(self.tokenizer_path).encode(text).ids


def prepare(
    data: str | None = None,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    cache_dir: str | None = None,
    val_fraction: float = 0.05,
    max_bytes: int = 8_000_000,
) -> Corpus:
    """Tokenise (once; later calls reuse the cache) and return the corpus. Safe to call from several
    processes at once: files are written under a temporary name and renamed."""
    external = tokenizer not in TOKENIZERS  # a tokenizers JSON file, e.g. a Hugging Face model's
    if external and not os.path.isfile(tokenizer):
        raise GptparConfigError(
            f"tokenizer={tokenizer!r} is neither one of {TOKENIZERS} nor an existing tokenizer.json file"
        )
    cache_dir = cache_dir or default_cache_dir()
    if data is not None and data.endswith(".bin"):
        if not os.path.exists(data):
            raise GptparConfigError(f"--data {data!r} does not exist")
        if os.path.getsize(data) % 2:
            raise GptparConfigError(
                f"--data {data!r} has {os.path.getsize(data)} bytes, an odd number: not a file of uint16 tokens"
            )
        tokens = np.memmap(data, dtype=np.uint16, mode="r")
        if len(tokens) == 0:
            raise GptparConfigError(f"--data {data!r} is empty: there is no text to train on")
        split = int(len(tokens) * (1 - val_fraction))
        return Corpus(tokens[:split], tokens[split:], int(tokens.max()) + 1, None)
    files = text_files(data) if data is not None else stdlib_files(max_bytes)
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(f"{tokenizer}:{vocab_size}:{max_bytes}".encode())
    if external:
        with open(tokenizer, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    key = h.hexdigest()[:16]
    folder = os.path.join(cache_dir, f"corpus-{key}")
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        os.makedirs(folder, exist_ok=True)
        text = _read(files)
        tok_path = None
        if tokenizer == "bytes":
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
            vocab = 256
        elif external:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(tokenizer)
            except Exception as e:
                raise GptparConfigError(
                    f"tokenizer {tokenizer!r} cannot be read by the tokenizers library: {e}"
                ) from None
            vocab = tok.get_vocab_size()
            token_dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
            chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
            ids = np.concatenate([np.asarray(e.ids, dtype=token_dtype) for e in tok.encode_batch(chunks)])
            tok_path = os.path.join(folder, "tokenizer.json")
            tmp = f"{tok_path}.{os.getpid()}.tmp"
            shutil.copyfile(tokenizer, tmp)
            os.replace(tmp, tok_path)
        else:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
            )
            chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
            tok.train_from_iterator(chunks, trainer)
            tok_path = os.path.join(folder, "tokenizer.json")
            tmp = f"{tok_path}.{os.getpid()}.tmp"
            tok.save(tmp)
            os.replace(tmp, tok_path)
            ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(chunks)])
            vocab = tok.get_vocab_size()
        if len(ids) < 16:
            raise GptparConfigError(f"the corpus has only {len(ids)} tokens: too little text to train on")
        split = int(len(ids) * (1 - val_fraction))
        for name, arr in (("train.bin", ids[:split]), ("val.bin", ids[split:])):
            tmp = os.path.join(folder, f"{name}.{os.getpid()}.tmp")
            arr.tofile(tmp)
            os.replace(tmp, os.path.join(folder, name))
        tmp = f"{meta_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(
                {
                    "vocab_size": vocab,
                    "tokenizer": "json" if external else tokenizer,
                    "files": len(files),
                    "tokens": int(len(ids)),
                    "dtype": np.dtype(ids.dtype).name,
                },
                f,
            )
        os.replace(tmp, meta_path)
    with open(meta_path) as f:
        meta = json.load(f)
    tok_path = os.path.join(folder, "tokenizer.json") if meta["tokenizer"] in ("bpe", "json") else None
    token_dtype = np.dtype(meta.get("dtype", "uint16"))
    train = np.memmap(os.path.join(folder, "train.bin"), dtype=token_dtype, mode="r")
    val = np.memmap(os.path.join(folder, "val.bin"), dtype=token_dtype, mode="r")
    return Corpus(train, val, meta["vocab_size"], tok_path)


def get_batch(tokens: np.ndarray, seq_len: int, batch: int, seed: int, step: int, dp_rank: int, dp: int):
    """``batch`` random windows for this dp rank at ``step``: ``(x, y)`` int64 ``[batch, seq_len]``. A pure
    function of its arguments (exact resumption); dp ranks draw disjoint rows of one global batch."""
    if len(tokens) <= seq_len + 1:
        raise GptparConfigError(f"the token file has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) & ((1 << 62) - 1))
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch * dp,), generator=g)[
        dp_rank * batch : (dp_rank + 1) * batch
    ]
    x = np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts.tolist()])
    y = np.stack([np.asarray(tokens[s + 1 : s + 1 + seq_len], dtype=np.int64) for s in starts.tolist()])
    return torch.from_numpy(x), torch.from_numpy(y)
