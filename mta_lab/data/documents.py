"""Documents: the unit of the train/validation split. Built-in corpora and user files become lists of
documents; a document's id decides its split, so adding files never moves existing ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mta_lab.data.errors import DataError


@dataclass(frozen=True)
class Document:
    id: str
    """Stable identity (a title, a path, or file:line)."""
    text: str


def builtin_documents(name: str) -> list[Document]:
    """A built-in corpus: ``shakespeare`` (shipped, 42 works) or ``stdlib`` (this Python's sources)."""
    if name == "shakespeare":
        packed = resources.files("mta_lab.data").joinpath("corpora/shakespeare.jsonl.xz").read_bytes()
        lines = lzma.decompress(packed).decode("utf-8").splitlines()
        return [Document(work["title"], work["text"]) for work in map(json.loads, lines)]
    if name == "stdlib":
        return stdlib_documents()
    raise DataError(f"unknown built-in corpus '{name}' (allowed: shakespeare, stdlib)")


def stdlib_documents() -> list[Document]:
    """The running Python's standard library ``.py`` files, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    documents = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skipped & set(relative.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of files use legacy encodings; the corpus does without them
        if text.strip():
            documents.append(Document(str(relative), text))
    if not documents:
        raise DataError(f"no Python sources found under {root} for the stdlib corpus")
    return documents


def split_documents(documents: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val): the val_fraction of documents whose id hashes lowest, at least one of each."""
    if len(documents) < 2:
        raise DataError(f"{len(documents)} document(s): a train/validation split needs at least 2")
    n_val = min(len(documents) - 1, max(1, round(val_fraction * len(documents))))
    ranked = sorted(documents, key=lambda d: hashlib.sha256(d.id.encode("utf-8")).hexdigest())
    val_ids = {d.id for d in ranked[:n_val]}
    return [d for d in documents if d.id not in val_ids], [d for d in documents if d.id in val_ids]


def read_documents(inputs: list[Path], text_field: str = "text") -> list[Document]:
    """Documents from text files, directories of them, JSONL (one per line) and Parquet (one per row)."""
    documents: list[Document] = []
    for path in inputs:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise DataError(f"{path}: the directory has no files")
            for file in files:
                documents += _read_file(file, text_field)
        elif path.is_file():
            documents += _read_file(path, text_field)
        else:
            raise DataError(f"{path}: no such file or directory")
    return documents


def _read_file(path: Path, text_field: str) -> list[Document]:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith(".jsonl") or suffixes.endswith(".jsonl.xz"):
        documents = list(_jsonl_documents(path, text_field))
    elif suffixes.endswith(".parquet"):
        documents = _parquet_documents(path, text_field)
    else:
        documents = [Document(str(path), _decode(path.read_bytes(), path))]
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise DataError(f"{path}: no text (the file is empty or every document is blank)")
    return documents


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not UTF-8 text (byte {error.start}: {data[error.start : error.start + 1]!r}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    for number, line in enumerate(io.StringIO(_decode(raw, path)), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}:{number}: no '{text_field}' field (found: {keys}); choose one with --text-field"
            )
        if not isinstance(record[text_field], str):
            raise DataError(
                f"{path}:{number}: '{text_field}' is {type(record[text_field]).__name__}, not text"
            )
        yield Document(f"{path}:{number}", record[text_field])


def _parquet_documents(path: Path, text_field: str) -> list[Document]:
    import polars as pl

    try:
        schema = pl.read_parquet_schema(path)
    except Exception as error:  # polars raises several error types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    if text_field not in schema:
        raise DataError(
            f"{path}: no '{text_field}' column (found: {', '.join(schema)}); choose one with --text-field"
        )
    if schema[text_field] != pl.String:
        raise DataError(f"{path}: column '{text_field}' is {schema[text_field]}, not text")
    column = pl.read_parquet(path, columns=[text_field])[text_field]
    return [Document(f"{path}:{row}", text) for row, text in enumerate(column) if text is not None]
