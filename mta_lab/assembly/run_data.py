"""Everything a run reads, assembled and checked before training starts (and before any MLflow run
exists): the tokenizer, each corpus's train/val token splits, the tasks, and the training mixture."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mta_lab.assembly.mixture import CorpusRows, Mixture, TaskRows
from mta_lab.config import RunConfig
from mta_lab.config.data import TokenizerKind
from mta_lab.data.datasets import Dataset, TokenSplit, builtin_dataset, open_dataset
from mta_lab.data.documents import Document, builtin_documents, split_documents
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import BPETokenizer, Tokenizer, cached_bpe, fixed_tokenizer
from mta_lab.tasks import HAYSTACK_TASKS, Haystack, Task, build_task


@dataclass
class Corpus:
    name: str
    weight: float
    dataset: Dataset
    train: TokenSplit
    val: TokenSplit


@dataclass
class RunData:
    config: RunConfig
    tokenizer: Tokenizer
    corpora: dict[str, Corpus]
    tasks: dict[str, Task]

    @property
    def row_len(self) -> int:
        return self.config.data.seq_len + 1

    def mixture(self) -> Mixture:
        """Training rows from corpora and tasks with weight > 0."""
        sources, weights = [], []
        for corpus in self.corpora.values():
            if corpus.weight > 0:
                sources.append(CorpusRows(corpus.train, self.row_len, self.config.data.seed, corpus.name))
                weights.append(corpus.weight)
        for name, task in self.tasks.items():
            weight = self.config.tasks.enabled()[name].weight
            if weight > 0:
                sources.append(TaskRows(task, self.row_len))
                weights.append(weight)
        return Mixture(sources, weights, self.config.data.seed)

    def val_rows(self, corpus: str, n_rows: int) -> np.ndarray:
        """The first n_rows packed rows of a corpus's val split (fewer if the split is shorter)."""
        split = self.corpora[corpus].val
        count = min(n_rows, split.n_rows(self.row_len))
        return np.stack([split.row(i, self.row_len) for i in range(count)])

    @cached_property
    def eval_examples(self) -> dict[str, list]:
        return {name: task.eval_examples() for name, task in self.tasks.items()}


def load_run_data(config: RunConfig) -> RunData:
    """Tokenizer, corpora and tasks of a run; a ``DataError`` names any problem."""
    data = config.data
    corpora_config = data.active_corpora()
    documents: dict[str, list[Document]] = {}
    prepared: dict[str, Dataset] = {}
    for name, corpus in corpora_config.items():
        if corpus.path is not None:
            prepared[name] = open_dataset(Path(corpus.path))
        else:
            documents[name] = builtin_documents(name)
    tokenizer = _tokenizer(config, prepared, documents)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise DataError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the {tokenizer.name} tokenizer's "
            f"{tokenizer.vocab_size} ids; set model.vocab_size={tokenizer.vocab_size}"
        )

    corpora: dict[str, Corpus] = {}
    for name, corpus in corpora_config.items():
        dataset = prepared.get(name) or builtin_dataset(name, tokenizer, data.val_fraction, documents[name])
        if dataset.tokenizer_name != tokenizer.name:
            raise DataError(
                f"corpus '{name}' ({dataset.path}) was tokenized with '{dataset.tokenizer_name}', but this run "
                f"uses '{tokenizer.name}' (data.tokenizer); prepare it with the same tokenizer"
            )
        train, val = dataset.split("train"), dataset.split("val")
        row_len = data.seq_len + 1
        if val.n_rows(row_len) == 0 or (corpus.weight > 0 and train.n_rows(row_len) == 0):
            raise DataError(
                f"corpus '{name}' is too small for data.seq_len={data.seq_len}: {len(train)} train and "
                f"{len(val)} val tokens, and each split needs at least one row of {row_len}"
            )
        corpora[name] = Corpus(name, corpus.weight, dataset, train, val)

    tasks: dict[str, Task] = {}
    for name, task_config in config.tasks.enabled().items():
        haystacks = None
        if name in HAYSTACK_TASKS:
            if not corpora:
                raise DataError(
                    f"tasks.{name} hides its facts in real text: give at least one corpus in data.corpora"
                )
            first = next(iter(corpora.values()))
            haystacks = {
                split: Haystack(getattr(first, split), tokenizer, first.name) for split in ("train", "val")
            }
        tasks[name] = build_task(name, task_config, tokenizer, data.seq_len, haystacks)

    run_data = RunData(config, tokenizer, corpora, tasks)
    _check_lengths(run_data)
    return run_data


def _tokenizer(
    config: RunConfig, prepared: dict[str, Dataset], documents: dict[str, list[Document]]
) -> Tokenizer:
    settings = config.data.tokenizer
    if settings.path is not None and not Path(settings.path).is_file():
        raise DataError(f"data.tokenizer.path: {settings.path} does not exist")
    tokenizer = fixed_tokenizer(settings)
    if tokenizer is not None:
        return tokenizer
    assert settings.kind == TokenizerKind.bpe
    files = {dataset.tokenizer_name: dataset.tokenizer_file() for dataset in prepared.values()}
    files = {name: path for name, path in files.items() if path is not None}
    if len(files) > 1:
        raise DataError(f"the prepared corpora use different BPE tokenizers ({', '.join(files)}); use one")
    if files:
        return BPETokenizer(next(iter(files.values())))
    if not documents:
        raise DataError(
            "data.tokenizer.kind=bpe needs training text: a built-in corpus or a prepared BPE dataset"
        )
    texts = [
        doc.text
        for name in sorted(documents)
        for doc in split_documents(documents[name], config.data.val_fraction)[0]
    ]
    return cached_bpe(texts, settings.vocab_size)


def _check_lengths(run_data: RunData) -> None:
    """Every evaluation example must fit the model; every training example one row."""
    longest = run_data.config.model.max_seq_len
    for name, examples in run_data.eval_examples.items():
        length = max(len(example.tokens) for example in examples)
        if length - 1 > longest:
            raise DataError(
                f"tasks.{name}: evaluation examples reach {length} tokens, beyond model.max_seq_len={longest}; "
                "shorten them or raise model.max_seq_len"
            )
    for name, task in run_data.tasks.items():
        if run_data.config.tasks.enabled()[name].weight > 0:
            length = len(task.train_example(0).tokens)
            if length > run_data.row_len:
                raise DataError(
                    f"tasks.{name}: training examples are {length} tokens; data.seq_len + 1 = {run_data.row_len}"
                )
