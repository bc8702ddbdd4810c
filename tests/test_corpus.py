"""gptpar.corpus: documents from every source (text files, JSONL, Parquet, a datasets save_to_disk folder)
tokenise to the same tokens, each document ended by the end-of-text token; document ids per window; and
bad input refused with a message naming the file and the rule."""

import json
import os

import numpy as np
import pytest
import torch

from gptpar.corpus import document_ids, prepare
from gptpar.errors import GptparConfigError

DOCS = ["def f(x):\n    return x + 1\n", "héllo wörld, a second document", "x" * 300, "the last one\n" * 5]


def write_sources(tmp):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp / "texts"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
    table = pa.table({"text": DOCS, "id": list(range(len(DOCS)))})
    pq.write_table(table, tmp / "docs.parquet")
    ds = tmp / "dataset"  # the layout of datasets' save_to_disk: Arrow IPC stream files + json metadata
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (ds / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return {
        "folder": str(folder),
        "jsonl": str(tmp / "docs.jsonl"),
        "parquet": str(tmp / "docs.parquet"),
        "datasets": str(ds),
    }


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_every_source_gives_the_same_documents_and_tokens(tmp_path, tokenizer):
    sources = write_sources(tmp_path)
    got = {}
    for name, path in sources.items():
        c = prepare(path, tokenizer, 300, str(tmp_path / "cache"))
        got[name] = np.concatenate([np.asarray(c.train), np.asarray(c.val)])
        assert c.eot is not None and int((got[name] == c.eot).sum()) == len(DOCS)  # one end-of-text per document
    first = got["folder"]
    for name, toks in got.items():
        assert np.array_equal(toks, first), name
    if tokenizer == "bytes":  # the bytes themselves, then 256
        want = np.concatenate([np.append(np.frombuffer(d.encode(), dtype=np.uint8), 256) for d in DOCS])
        assert np.array_equal(first, want)


def test_document_ids_end_each_document_at_its_end_of_text_token():
    eot = 9
    x = torch.tensor([[1, 2, 9, 3, 9, 9, 4], [5, 6, 7, 8, 1, 2, 3]])
    assert document_ids(x, eot).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0]]


def test_bad_input_is_refused_naming_the_file_and_the_rule(tmp_path):
    cache = str(tmp_path / "cache")
    (tmp_path / "bad.txt").write_bytes(b"ok so far \xff\xfe then garbage")
    with pytest.raises(GptparConfigError, match=r"bad.txt is not UTF-8 text: undecodable byte 0xff at byte offset 10"):
        prepare(str(tmp_path / "bad.txt"), "bytes", cache_dir=cache)
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(
        GptparConfigError, match=r"a.jsonl line 1 has no field 'text' \(--text-field\); it has \['body'\]"
    ):
        prepare(str(tmp_path / "a.jsonl"), "bytes", cache_dir=cache)
    sources = write_sources(tmp_path)
    with pytest.raises(GptparConfigError, match=r"has no field 'body' \(--text-field\); its fields: \['text', 'id'\]"):
        prepare(sources["parquet"], "bytes", cache_dir=cache, text_field="body")
    with pytest.raises(GptparConfigError, match="document 0 .'id'. is a int, not text"):
        prepare(sources["datasets"], "bytes", cache_dir=cache, text_field="id")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(GptparConfigError, match="is empty: there is no text to train on"):
        prepare(str(tmp_path / "empty.jsonl"), "bytes", cache_dir=cache)
    with pytest.raises(GptparConfigError, match="does not exist"):
        prepare(str(tmp_path / "missing.parquet"), "bytes", cache_dir=cache)
    assert not os.path.exists(os.path.join(cache, "corpus-none"))
