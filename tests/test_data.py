"""Tokenizers, documents and their split, prepared datasets, and the training stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mta_lab.assembly.mixture import BLOCK, Mixture, collate
from mta_lab.data.datasets import TokenSplit, open_dataset, prepare_dataset
from mta_lab.data.documents import Document, builtin_documents, read_documents, split_documents
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import ByteTokenizer, CharTokenizer, cached_bpe


def test_byte_tokenizer_round_trip_and_bytes():
    tokenizer = ByteTokenizer()
    text = "naïve café — 東京"
    ids = tokenizer.encode(text)
    assert (
        ids == list(text.encode("utf-8")) and tokenizer.decode([tokenizer.bos, *ids, tokenizer.eos]) == text
    )
    assert tokenizer.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert tokenizer.token_bytes[list(tokenizer.special_ids)].tolist() == [0, 0, 0]


def test_char_tokenizer_is_the_official_toy_alphabet():
    tokenizer = CharTokenizer()
    assert tokenizer.encode("az.#_") == [0, 25, 26, 27, 28]  # spec 3.2
    assert (tokenizer.bos, tokenizer.eos, tokenizer.vocab_size) == (29, 30, 32)
    with pytest.raises(ValueError, match=r"not \['A', '!'\]|not \['!', 'A'\]"):
        tokenizer.encode("aA!")


def test_bpe_trains_locally_is_cached_and_counts_bytes():
    texts = [doc.text[:20_000] for doc in builtin_documents("shakespeare")[:4]]
    tokenizer = cached_bpe(texts, 400)
    assert tokenizer.vocab_size == 400 and cached_bpe(texts, 400).path == tokenizer.path
    text = "To be, or not to be: that is the question. 東京"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # it merged something
    assert tokenizer.token_bytes[ids].sum() == len(text.encode("utf-8"))  # bits per byte stay exact


def test_builtin_corpora():
    works = builtin_documents("shakespeare")
    assert len(works) == 42 and works[0].id == "ALL'S WELL THAT ENDS WELL"
    assert all(work.text.startswith(work.id) for work in works)
    code = builtin_documents("stdlib")
    assert len(code) > 500 and any(doc.id == "json/decoder.py" for doc in code)


def test_split_is_by_document_deterministic_and_stable():
    docs = [Document(f"doc{i}", f"text {i}") for i in range(100)]
    train, val = split_documents(docs, 0.1)
    assert len(val) == 10 and {d.id for d in train}.isdisjoint(d.id for d in val)
    assert split_documents(list(reversed(docs)), 0.1)[1] == list(reversed(val))  # order does not matter
    # Adding documents never moves an existing one from train to val.
    _, val_more = split_documents(docs + [Document(f"new{i}", "x") for i in range(100)], 0.1)
    assert {d.id for d in val_more if d.id.startswith("doc")} <= {d.id for d in val}


def test_prepare_writes_documents_with_markers(tmp_path):
    docs = [Document(f"d{i}", f"document number {i}\n") for i in range(10)]
    tokenizer = ByteTokenizer()
    dataset = prepare_dataset(docs, tokenizer, tmp_path / "ds", 0.2, {"test": True}, progress=False)
    reopened = open_dataset(tmp_path / "ds")
    assert reopened.meta == dataset.meta and reopened.tokenizer_name == "byte"
    train_ids = {d.id for d in split_documents(docs, 0.2)[0]}
    expected = [t for d in docs if d.id in train_ids for t in [256, *d.text.encode(), 257]]
    assert reopened.split("train").window(0, len(expected)).tolist() == expected
    assert reopened.meta["splits"]["train"]["bytes"] == sum(len(d.text) for d in docs if d.id in train_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no staging directory left


def test_prepare_leaves_nothing_behind_on_failure(tmp_path):
    docs = [Document("a", "fine.text"), Document("b", "ÉÉÉ not in the toy alphabet")]
    with pytest.raises(DataError, match="^b: the char tokenizer encodes only"):
        prepare_dataset(docs, CharTokenizer(), tmp_path / "ds", 0.5, {}, progress=False)
    assert list(tmp_path.iterdir()) == []
    prepare_dataset(
        [Document("a", "ab"), Document("b", "cd")], CharTokenizer(), tmp_path / "ds", 0.5, {}, progress=False
    )
    with pytest.raises(DataError, match="already exists"):
        prepare_dataset([Document("a", "ab"), Document("b", "cd")], CharTokenizer(), tmp_path / "ds", 0.5, {})


def test_read_documents_formats_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("plain text")
    import polars as pl

    pl.DataFrame({"body": ["p1", None, "p2"]}).write_parquet(tmp_path / "t.parquet")
    docs = read_documents([tmp_path / "a.jsonl", tmp_path / "dir"])
    assert [d.text for d in docs] == ["one", "two", "plain text"]
    assert [d.text for d in read_documents([tmp_path / "t.parquet"], text_field="body")] == ["p1", "p2"]

    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    cases = {
        "bad.jsonl": r"bad\.jsonl:1: no 'text' field \(found: body\)",
        "latin1.txt": r"latin1\.txt: not UTF-8 text \(byte 3",
        "empty.txt": r"empty\.txt: no text",
        "broken.jsonl": r"broken\.jsonl:2: not valid JSON",
        "missing.txt": r"missing\.txt: no such file",
        "t.parquet": r"t\.parquet: no 'text' column \(found: body\)",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_documents([tmp_path / name])


def test_token_split_windows_cross_shards():
    split = TokenSplit([np.arange(0, 5), np.arange(5, 12), np.arange(12, 13)])
    assert split.window(3, 8).tolist() == list(range(3, 11))
    assert split.n_rows(4) == 3 and split.row(2, 4).tolist() == [8, 9, 10, 11]
    with pytest.raises(IndexError):
        split.window(10, 4)


class Counter:
    """A row source that records which of its rows were asked for."""

    def __init__(self, tag: int):
        self.tag = tag

    def row(self, index: int):
        return np.array([self.tag, index, 0]), np.array([False, True, True])


def test_mixture_follows_weights_and_resumes_exactly():
    mixture = Mixture([Counter(0), Counter(1)], [3.0, 1.0], seed=7)
    stream = mixture.rows(0)
    rows = [next(stream)[0] for _ in range(3 * BLOCK)]
    share = np.mean([r[0] == 1 for r in rows])
    assert 0.22 < share < 0.28  # weight 1 of 4
    # Each source serves its rows in order, without gaps or repeats.
    for tag in (0, 1):
        assert [r[1] for r in rows if r[0] == tag] == list(range(sum(r[0] == tag for r in rows)))
    for start in (0, 5, BLOCK - 1, BLOCK, 2 * BLOCK + 17):
        resumed = mixture.rows(start)
        assert all(np.array_equal(next(resumed)[0], rows[start + i]) for i in range(50))
    assert not np.array_equal(
        Mixture([Counter(0), Counter(1)], [3.0, 1.0], seed=8).block(0), mixture.block(0)
    )


def test_collate_shifts_targets():
    batch = collate([(np.array([1, 2, 3, 4]), np.array([False, False, True, True]))])
    assert batch["inputs"].tolist() == [[1, 2, 3]] and batch["targets"].tolist() == [[2, 3, 4]]
    assert batch["mask"].tolist() == [[False, True, True]]


def test_dataset_from_a_future_format_is_refused(tmp_path):
    prepare_dataset(
        [Document("a", "ab"), Document("b", "cd")], ByteTokenizer(), tmp_path / "ds", 0.5, {}, progress=False
    )
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    (tmp_path / "ds" / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(DataError, match="format 99"):
        open_dataset(Path(tmp_path / "ds"))
