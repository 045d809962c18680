"""Multi-query associative recall (Arora et al. 2023, "Zoology"): a standard probe of what an
attention variant can retrieve.

After BOS come ``pairs`` key-value pairs (k1 v1 k2 v2 ...); the rest of the sequence holds every key
once more, in random order at random places, each followed by its value, which is scored. Keys and
values are single tokens from two disjoint sets of non-special ids; the other places hold filler
(PAD), as Zoology fills them with 0.
"""

from __future__ import annotations

from mta_lab.config.data import MQARConfig
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import Tokenizer
from mta_lab.tasks.base import Example, Task, seeded


class MQAR(Task):
    name = "mqar"

    def __init__(self, config: MQARConfig, tokenizer: Tokenizer, seq_len: int):
        super().__init__(tokenizer, seq_len)
        self.config = config
        ordinary = [i for i in range(tokenizer.vocab_size) if i not in tokenizer.special_ids]
        half = len(ordinary) // 2
        self.keys, self.values = ordinary[:half], ordinary[half : 2 * half]
        most = max([config.pairs, *config.eval_pairs])
        if most > half:
            raise DataError(
                f"tasks.mqar: {most} pairs need {most} distinct keys and values; the {tokenizer.name} "
                f"tokenizer has {half} of each"
            )

    def example(self, split: str, pairs: int, length: int, index: int) -> Example:
        rng = seeded(self.name, self.config.seed, split, pairs, length, index)
        keys, values = rng.sample(self.keys, pairs), rng.sample(self.values, pairs)
        tokens = [self.tokenizer.bos]
        for key, value in zip(keys, values, strict=True):
            tokens += [key, value]
        slots = (length - len(tokens)) // 2  # two-token places for the queries
        if slots < pairs:
            raise DataError(
                f"tasks.mqar: {pairs} pairs and their queries need {1 + 4 * pairs} tokens, more than {length}; "
                "use longer tasks.mqar.eval_lengths (data.seq_len for training) or fewer pairs"
            )
        asked = rng.sample(range(pairs), pairs)
        query_slots = iter(sorted(rng.sample(range(slots), pairs)))
        next_slot, scored = next(query_slots), []
        queue = iter(asked)
        for slot in range(slots):
            if slot == next_slot:
                pair = next(queue)
                tokens += [keys[pair], values[pair]]
                scored.append(len(tokens) - 1)
                next_slot = next(query_slots, -1)
            else:
                tokens += [self.tokenizer.pad, self.tokenizer.pad]
        tokens += [self.tokenizer.pad] * (length - len(tokens))
        return Example(tokens, scored, (("pairs", pairs), ("length", length)))

    def train_example(self, index: int) -> Example:
        return self.example("train", self.config.pairs, self.seq_len + 1, index)

    def eval_examples(self) -> list[Example]:
        return [
            self.example("test", pairs, length, i)
            for pairs in self.config.eval_pairs
            for length in self.config.eval_lengths
            for i in range(self.config.eval_samples)
        ]
