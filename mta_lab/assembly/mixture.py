"""The training stream: rows of seq_len + 1 tokens mixed from corpora and tasks by weight.

Row n of the stream is a pure function of (data seed, n): its source is drawn in seeded blocks, a
corpus serves its packed rows in a seeded permutation per epoch, and a task generates its n-th example.
A run resumed at optimizer step k therefore continues with exactly the rows the uninterrupted run
would have read, with no loader state to save.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset

from mta_lab.data.datasets import TokenSplit
from mta_lab.tasks.base import Task

BLOCK = 1024
"""Rows whose sources are drawn together; resuming at row n costs n / BLOCK small draws."""


class RowSource(Protocol):
    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, scored) of length seq_len + 1: ids, and which positions are training targets."""
        ...


class CorpusRows:
    """Packed rows of a corpus split, in a fresh seeded order every epoch; every token is a target."""

    def __init__(self, split: TokenSplit, row_len: int, seed: int, name: str):
        self.split, self.row_len = split, row_len
        self.n_rows = split.n_rows(row_len)
        self.seed = (seed, zlib.crc32(name.encode()))
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        epoch, position = divmod(index, self.n_rows)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([*self.seed, epoch]).permutation(self.n_rows)
        tokens = self.split.row(int(self._order[position]), self.row_len)
        scored = np.ones(self.row_len, dtype=bool)
        scored[0] = False  # the first token is only read
        return tokens, scored


class TaskRows:
    """One task example per row, right-padded; only its scored positions are targets."""

    def __init__(self, task: Task, row_len: int):
        self.task, self.row_len = task, row_len

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.task.train_example(index).row(self.row_len, self.task.tokenizer.pad)


@dataclass
class Mixture:
    sources: list[RowSource]
    weights: list[float]
    seed: int

    def __post_init__(self) -> None:
        total = sum(self.weights)
        self.probabilities = np.asarray(self.weights, dtype=np.float64) / total

    def block(self, index: int) -> np.ndarray:
        """The sources of rows [index * BLOCK, (index + 1) * BLOCK)."""
        rng = np.random.default_rng([self.seed, index])
        return rng.choice(len(self.sources), size=BLOCK, p=self.probabilities)

    def rows(self, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows from global row ``start`` on."""
        first_block, offset = divmod(start, BLOCK)
        served = np.zeros(len(self.sources), dtype=np.int64)  # rows each source served before start
        for block in range(first_block):
            served += np.bincount(self.block(block), minlength=len(self.sources))
        block = first_block
        while True:
            choices = self.block(block)
            served += np.bincount(choices[:offset], minlength=len(self.sources))
            for source in choices[offset:]:
                yield self.sources[source].row(int(served[source]))
                served[source] += 1
            block, offset = block + 1, 0


def collate(rows: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Rows of seq_len + 1 -> inputs (b, t), targets (b, t) and the target mask (b, t)."""
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    scored = torch.from_numpy(np.stack([r[1] for r in rows]))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": scored[:, 1:]}


class TrainStream(IterableDataset):
    """The mixture from a starting row; with several data-parallel ranks, rank r takes rows r, r + n, ..."""

    def __init__(self, mixture: Mixture, start: int, rank: int = 0, world_size: int = 1):
        self.mixture, self.start, self.rank, self.world_size = mixture, start, rank, world_size

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        rows = self.mixture.rows(self.start)
        return itertools.islice(rows, self.rank, None, self.world_size)
