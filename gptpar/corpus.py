"""Training data: documents -> tokens -> a memory-mapped uint16/uint32 token file -> batches per dp rank.

* Default corpus, no download: the Python standard library's own ``.py`` sources on this machine.
* ``--data PATH``: a text file, a folder of text files (``.txt``, ``.md``, ``.py``, ``.rst``), JSON lines
  (``.jsonl``: each record's ``--text-field``), Parquet (``.parquet``, that column), a Hugging Face
  ``datasets`` directory (``save_to_disk``: its Arrow files, that column), or a pre-tokenised nanoGPT
  ``.bin`` (uint16 tokens; its vocabulary size must be given). Each file or record is one document.
* Documents are packed one after another, each ended by the tokeniser's end-of-text token (``eot``), so
  a batch knows where they meet (:func:`document_ids`): attention can stop there and positions restart.
* Tokeniser: byte-level BPE trained with the ``tokenizers`` package (``bpe``, with ``<|endoftext|>``),
  raw bytes (``bytes``: 256 byte tokens and end-of-text 256), or a ``tokenizer.json`` (its own
  end-of-text token, e.g. ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``). Tokens are written once
  under the cache dir, keyed by the corpus and tokeniser, with the last 5% held out for validation.
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


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptparConfigError(
            f"{where} is not UTF-8 text: undecodable byte 0x{raw[e.start]:02x} at byte offset {e.start}"
        ) from None


def _is_datasets_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json"))


def source_files(data: str | None, max_bytes: int = 8_000_000) -> list[str]:
    """The files that make up a ``--data`` source (for the cache key)."""
    if data is None:
        return stdlib_files(max_bytes)
    if _is_datasets_dir(data):
        return sorted(os.path.join(data, f) for f in os.listdir(data))
    if data.endswith((".jsonl", ".parquet")):
        if not os.path.exists(data):
            raise GptparConfigError(f"--data {data!r} does not exist")
        return [data]
    return text_files(data)


def _column(table, field: str, where: str) -> list:
    if field not in table.column_names:
        raise GptparConfigError(f"{where} has no field {field!r} (--text-field); its fields: {table.column_names}")
    return table.column(field).to_pylist()


def documents(data: str | None, text_field: str = "text", max_bytes: int = 8_000_000) -> list[str]:
    """The documents of a ``--data`` source, in a fixed order (see the module docstring)."""
    if data is None:
        return [_decode(open(f, "rb").read(), f) for f in stdlib_files(max_bytes)]
    if _is_datasets_dir(data):  # datasets' save_to_disk: Arrow IPC streams listed in state.json
        import pyarrow as pa

        state = os.path.join(data, "state.json")
        names = (
            [f["filename"] for f in json.load(open(state))["_data_files"]]
            if os.path.exists(state)
            else sorted(f for f in os.listdir(data) if f.endswith(".arrow"))
        )
        docs = []
        for name in names:
            with pa.memory_map(os.path.join(data, name)) as src:
                docs += _column(pa.ipc.open_stream(src).read_all(), text_field, os.path.join(data, name))
    elif data.endswith(".parquet"):
        import pyarrow.parquet as pq

        docs = _column(pq.read_table(data), text_field, data)
    elif data.endswith(".jsonl"):
        docs = []
        with open(data, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(_decode(line, f"{data} line {n}"))
                except json.JSONDecodeError as e:
                    raise GptparConfigError(f"{data} line {n} is not JSON: {e}") from None
                if not isinstance(rec, dict) or text_field not in rec:
                    keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                    raise GptparConfigError(
                        f"{data} line {n} has no field {text_field!r} (--text-field); it has {keys}"
                    )
                docs.append(rec[text_field])
    else:
        docs = [_decode(open(f, "rb").read(), f) for f in text_files(data)]
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise GptparConfigError(
            f"--data {data!r}: document {bad} ({text_field!r}) is a {type(docs[bad]).__name__}, not text"
        )
    if not any(docs):
        raise GptparConfigError(f"--data {data!r} is empty: there is no text to train on")
    return docs


EOT_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>")


def _eot_of(tok) -> int | None:
    vocab = tok.get_vocab()
    return next((vocab[t] for t in EOT_TOKENS if t in vocab), None)


def document_ids(x: torch.Tensor, eot: int) -> torch.Tensor:
    """``x [b, s]`` token ids -> ``[b, s]`` the index of each token's document within its window: an
    end-of-text token belongs to the document it ends."""
    end = (x == eot).long()
    return end.cumsum(dim=-1) - end


@dataclass
class Corpus:
    """A tokenised corpus: memory-mapped train/val token arrays and how to decode them."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer_path: str | None  # tokenizers' JSON for bpe; None for bytes / pre-tokenised
    eot: int | None = None  # the end-of-text token between documents (None: documents not marked)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer_path is None:  # generated text: a model may produce any byte sequence
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
    text_field: str = "text",
    progress: bool = False,
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
        return _pretokenised(data, val_fraction)
    files = source_files(data, max_bytes)
    h = hashlib.sha256(b"documents-v2")  # the token file's format: documents ended by end-of-text
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    h.update(f"{tokenizer}:{vocab_size}:{max_bytes}:{text_field}".encode())
    if external:
        with open(tokenizer, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    folder = os.path.join(cache_dir, f"corpus-{h.hexdigest()[:16]}")
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        os.makedirs(folder, exist_ok=True)
        docs = documents(data, text_field, max_bytes)
        ids, vocab, eot, tok_path = _tokenise(docs, tokenizer, vocab_size, folder, progress)
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
                    "documents": len(docs),
                    "tokens": int(len(ids)),
                    "dtype": np.dtype(ids.dtype).name,
                    "eot": eot,
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
    return Corpus(train, val, meta["vocab_size"], tok_path, meta.get("eot"))


def _pretokenised(data: str, val_fraction: float) -> Corpus:
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


def _tokenise(docs: list[str], tokenizer: str, vocab_size: int, folder: str, progress: bool):
    """``(token ids, vocab size, end-of-text id, tokenizer.json path)``: every document's tokens followed by
    the end-of-text token (when the tokeniser has one), in the smallest unsigned dtype that holds them."""
    from tqdm import tqdm

    def bar(what: str):
        return tqdm(desc=f"tokenising ({what})", unit="doc", disable=not progress, total=len(docs))

    tok_path = None
    if tokenizer == "bytes":
        eot, vocab = 256, 257
        encoded = []
        with bar("bytes") as b:
            for d in docs:
                encoded.append(np.append(np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.uint16), eot))
                b.update(1)
    else:
        from tokenizers import Tokenizer

        if tokenizer == "bpe":
            from tokenizers import decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                special_tokens=["<|endoftext|>"],
                show_progress=False,
            )
            tok.train_from_iterator((d[i : i + 100_000] for d in docs for i in range(0, len(d), 100_000)), trainer)
        else:
            try:
                tok = Tokenizer.from_file(tokenizer)
            except Exception as e:
                raise GptparConfigError(
                    f"tokenizer {tokenizer!r} cannot be read by the tokenizers library: {e}"
                ) from None
        vocab, eot = tok.get_vocab_size(), _eot_of(tok)
        encoded = []
        with bar(tokenizer if tokenizer == "bpe" else "tokenizer.json") as b:
            for i in range(0, len(docs), 256):
                for e in tok.encode_batch(docs[i : i + 256], add_special_tokens=False):
                    encoded.append(np.asarray(e.ids + ([eot] if eot is not None else []), dtype=np.int64))
                b.update(len(docs[i : i + 256]))
        tok_path = os.path.join(folder, "tokenizer.json")
        tmp = f"{tok_path}.{os.getpid()}.tmp"
        if tokenizer == "bpe":
            tok.save(tmp)
        else:
            shutil.copyfile(tokenizer, tmp)
        os.replace(tmp, tok_path)
    if vocab > 1 << 32:
        raise GptparConfigError(f"a vocabulary of {vocab} tokens does not fit uint32 token files")
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    ids = np.concatenate(encoded).astype(dtype) if encoded else np.zeros(0, dtype=dtype)
    return ids, vocab, eot, tok_path


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
