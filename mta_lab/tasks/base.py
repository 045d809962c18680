"""Synthetic tasks: seeded generators of token-id examples, and the summary of how a model did.

A task yields :class:`Example` s: token ids and the positions the model must predict. Training uses
the loss on those positions only; evaluation is teacher-forced: a position is correct when the
argmax of the logits before it is the token, and an example is correct when all its positions are
(for a single answer this equals greedy decoding of it). Examples carry their evaluation cell
(e.g. needles=4, depth=50) so accuracy is reported per cell and per value of each dimension.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mta_lab.data.tokenizers import Tokenizer

Cell = tuple[tuple[str, int | str], ...]


@dataclass(frozen=True)
class Example:
    tokens: list[int]
    """Token ids, BOS first."""
    scored: list[int]
    """Positions i whose token the model must predict from tokens[:i]."""
    cell: Cell = ()
    """The evaluation cell, e.g. (("needles", 4), ("depth", 50))."""

    @classmethod
    def prompt_answer(cls, prompt: list[int], answer: list[int], cell: Cell = ()) -> Example:
        """An example scored on the answer that follows the prompt."""
        return cls(prompt + answer, list(range(len(prompt), len(prompt) + len(answer))), cell)

    def row(self, length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens right-padded to ``length`` and the boolean mask of scored positions."""
        if len(self.tokens) > length:
            raise ValueError(f"example of {len(self.tokens)} tokens does not fit a row of {length}")
        tokens = np.full(length, pad, dtype=np.int64)
        tokens[: len(self.tokens)] = self.tokens
        scored = np.zeros(length, dtype=bool)
        scored[self.scored] = True
        return tokens, scored


@dataclass
class Tally:
    """Counts of one evaluation cell."""

    examples: int = 0
    examples_correct: int = 0
    tokens: int = 0
    tokens_correct: int = 0

    def add(self, other: Tally) -> None:
        self.examples += other.examples
        self.examples_correct += other.examples_correct
        self.tokens += other.tokens
        self.tokens_correct += other.tokens_correct


def seeded(*parts: object) -> random.Random:
    """A generator determined by its parts (strings hash stably across processes and runs)."""
    return random.Random("/".join(map(str, parts)))


class Task(ABC):
    name: ClassVar[str]

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        """Training examples are at most seq_len + 1 tokens (one row)."""

    @abstractmethod
    def train_example(self, index: int) -> Example:
        """The index-th training example: deterministic, and disjoint from the evaluation set."""

    @abstractmethod
    def eval_examples(self) -> list[Example]:
        """The fixed held-out set."""

    def metrics(self, tallies: dict[Cell, Tally]) -> dict[str, float]:
        """``<task>/acc`` (examples all correct) and ``<task>/token_acc`` overall, per value of each
        cell dimension (``<task>/acc/depth_50``) and per cell (``<task>/acc/needles_4/depth_50``)."""
        groups: dict[str, Tally] = defaultdict(Tally)
        for cell, tally in tallies.items():
            groups[""].add(tally)
            if len(cell) > 1:
                for key, value in cell:
                    groups[f"/{key}_{value}"].add(tally)
            if cell:
                groups["/" + "/".join(f"{key}_{value}" for key, value in cell)].add(tally)
        metrics = {}
        for suffix, tally in sorted(groups.items()):
            metrics[f"{self.name}/acc{suffix}"] = tally.examples_correct / tally.examples
            metrics[f"{self.name}/token_acc{suffix}"] = tally.tokens_correct / tally.tokens
        return metrics
