"""Real text to hide things in: windows of a corpus split as token ids, and insertion of pieces at
chosen depths, moved to the next end of a sentence or line so that they read as text."""

from __future__ import annotations

import random

import numpy as np

from mta_lab.data.datasets import TokenSplit
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import Tokenizer

SNAP_RANGE = 256
"""How far (tokens) an insertion point may move to reach a sentence or line end."""


class Haystack:
    def __init__(self, split: TokenSplit, tokenizer: Tokenizer, corpus: str):
        self.split, self.tokenizer, self.corpus = split, tokenizer, corpus
        # Ids whose text ends a sentence or a line: an insertion goes right after one of them.
        texts = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]
        self.boundary = np.array([t.endswith((".", "\n", "!", "?")) for t in texts])
        self.special = np.zeros(tokenizer.vocab_size, dtype=bool)
        self.special[list(tokenizer.special_ids)] = True

    def take(self, n_tokens: int, rng: random.Random) -> list[int]:
        """n_tokens of running text from a random place, without document markers."""
        if n_tokens == 0:
            return []
        span = 2 * n_tokens + 64  # room for the BOS/EOS markers that are dropped
        if len(self.split) < span:
            raise DataError(
                f"corpus '{self.corpus}' has {len(self.split)} tokens in this split; a haystack of "
                f"{n_tokens} tokens needs more text"
            )
        window = self.split.window(rng.randrange(len(self.split) - span + 1), span)
        text = window[~self.special[window]]
        if len(text) < n_tokens:
            raise DataError(f"corpus '{self.corpus}' has too little text between documents for a haystack")
        return text[:n_tokens].tolist()

    def insert(self, filler: list[int], pieces: list[list[int]], depths: list[float]) -> list[int]:
        """``filler`` with each piece inserted at its depth (fraction 0..1), in order of depth."""
        points = [self._snap(filler, round(depth * len(filler))) for depth in depths]
        out, previous = [], 0
        for point, piece in sorted(zip(points, pieces, strict=True), key=lambda pair: pair[0]):
            out += filler[previous:point] + piece
            previous = point
        return out + filler[previous:]

    def _snap(self, filler: list[int], point: int) -> int:
        if point in (0, len(filler)):
            return point
        for distance in range(SNAP_RANGE):
            for candidate in (point + distance, point - distance):
                if 0 < candidate <= len(filler) and self.boundary[filler[candidate - 1]]:
                    return candidate
        return point
