"""Prepared datasets: documents tokenized into memory-mapped shards, split into train and val.

Layout of a dataset directory::

    meta.json          format, tokenizer name and vocabulary, per-split documents/tokens/bytes/shards
    tokenizer.json     (BPE only) the tokenizer the shards were encoded with
    train-000.bin ...  token ids, uint16 or uint32; each document is BOS + text + EOS, back to back
    val-000.bin ...

A dataset is written into a temporary sibling directory and renamed into place at the end, so an
error or an interruption never leaves a partial dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mta_lab.data.cache import cache_dir
from mta_lab.data.documents import Document, builtin_documents, split_documents
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import BPETokenizer, Tokenizer

FORMAT = 1
SHARD_TOKENS = 1 << 28
SPLITS = ("train", "val")


class TokenSplit:
    """One split's token stream, across its shards, without loading it into memory."""

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside {len(self)} tokens")
        parts, position, end = [], start, start + length
        while position < end:
            shard = int(np.searchsorted(self.starts, position, side="right")) - 1
            offset = position - int(self.starts[shard])
            take = min(end - position, len(self.shards[shard]) - offset)
            parts.append(np.asarray(self.shards[shard][offset : offset + take], dtype=np.int64))
            position += take
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def n_rows(self, row_len: int) -> int:
        return len(self) // row_len

    def row(self, index: int, row_len: int) -> np.ndarray:
        """The index-th packed row of row_len tokens."""
        return self.window(index * row_len, row_len)


@dataclass
class Dataset:
    path: Path
    meta: dict

    @property
    def tokenizer_name(self) -> str:
        return self.meta["tokenizer"]

    def split(self, name: str) -> TokenSplit:
        info = self.meta["splits"][name]
        dtype = np.dtype(self.meta["dtype"])
        return TokenSplit([np.memmap(self.path / shard, dtype=dtype, mode="r") for shard in info["shards"]])

    def tokenizer_file(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None


def open_dataset(path: Path) -> Dataset:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"{path}: not a prepared dataset (no meta.json); make one with `mta-lab data prepare`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: dataset format {meta.get('format')} is not {FORMAT}; prepare it again")
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            if not (path / shard).is_file():
                raise DataError(f"{path}: shard {shard} is missing; prepare the dataset again")
    return Dataset(path, meta)


def prepare_dataset(
    documents: list[Document],
    tokenizer: Tokenizer,
    out: Path,
    val_fraction: float,
    source: dict,
    force: bool = False,
    progress: bool = True,
) -> Dataset:
    """Split ``documents`` by document, tokenize, and write a dataset to ``out``."""
    if out.exists() and not force:
        raise DataError(f"{out}: already exists; choose another --out or pass --force to replace it")
    train, val = split_documents(documents, val_fraction)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        splits = {
            name: _write_split(docs, tokenizer, staging, name, dtype, progress)
            for name, docs in (("train", train), ("val", val))
        }
        if isinstance(tokenizer, BPETokenizer):
            shutil.copyfile(tokenizer.path, staging / "tokenizer.json")
        meta = {
            "format": FORMAT,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name,
            "val_fraction": val_fraction,
            "splits": splits,
            "source": source,
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if force and out.exists():
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:
            if not (out / "meta.json").is_file():
                raise
            shutil.rmtree(staging)  # another process prepared the same dataset first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Dataset(out, meta)


def _write_split(
    docs: list[Document], tokenizer: Tokenizer, directory: Path, name: str, dtype, progress: bool
) -> dict:
    shards: list[str] = []
    buffer: list[np.ndarray] = []
    buffered = tokens = n_bytes = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if buffer:
            shard = f"{name}-{len(shards):03d}.bin"
            np.concatenate(buffer).astype(dtype).tofile(directory / shard)
            shards.append(shard)
            buffer, buffered = [], 0

    batch = 256
    bar = tqdm(
        total=len(docs), desc=f"tokenizing {name}", unit="doc", disable=not progress or None, leave=False
    )
    for first in range(0, len(docs), batch):
        chunk = docs[first : first + batch]
        for doc, ids in zip(chunk, _encode(tokenizer, chunk), strict=True):
            row = np.asarray([tokenizer.bos, *ids, tokenizer.eos], dtype=np.int64)
            buffer.append(row)
            buffered += len(row)
            tokens += len(row)
            n_bytes += len(doc.text.encode("utf-8"))
            if buffered >= SHARD_TOKENS:
                flush()
        bar.update(len(chunk))
    bar.close()
    flush()
    return {"documents": len(docs), "tokens": tokens, "bytes": n_bytes, "shards": shards}


def _encode(tokenizer: Tokenizer, docs: list[Document]) -> list[list[int]]:
    try:
        return tokenizer.encode_many([d.text for d in docs])
    except ValueError:
        for doc in docs:  # find the document to name
            try:
                tokenizer.encode(doc.text)
            except ValueError as error:
                raise DataError(f"{doc.id}: {error}") from None
        raise


def builtin_dataset(
    name: str, tokenizer: Tokenizer, val_fraction: float, documents: list[Document] | None = None
) -> Dataset:
    """A built-in corpus tokenized with ``tokenizer``, prepared once and kept in the cache."""
    documents = documents if documents is not None else builtin_documents(name)
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(hashlib.sha256(f"{doc.id}\0{doc.text}".encode()).digest())
    key = f"{name}-{digest.hexdigest()[:12]}-{tokenizer.name}-val{val_fraction:g}-f{FORMAT}"
    path = cache_dir() / "datasets" / key
    if not (path / "meta.json").is_file():
        source = {"builtin": name, "documents": len(documents), "sha256": digest.hexdigest()}
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            prepare_dataset(documents, tokenizer, path, val_fraction, source, progress=False)
        except DataError:
            if not (path / "meta.json").is_file():
                raise  # not a concurrent preparation of the same corpus
    return open_dataset(path)
