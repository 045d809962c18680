"""The paper's toy task "find the block" (spec 3; the official toy_task/generate_data.py).

Input: blocks of N distinct letters joined by '.', then '#' and L query letters. Exactly one block
(the target) holds all query letters; distractors may hold some but never all. The answer is the
target block (``all``), or its first or last letter (the paper's Table 1 variants), then EOS.
Metric: teacher-forced error, per sequence (any answer token wrong) and per token.
"""

from __future__ import annotations

import math
import string

from mta_lab.config.data import ToyBlockConfig, ToyOutput
from mta_lab.data.tokenizers import Tokenizer
from mta_lab.tasks.base import Cell, Example, Tally, Task, seeded

ALPHABET = string.ascii_lowercase


def make_puzzle(config: ToyBlockConfig, rng) -> tuple[str, str, str]:
    """(blocks + '#' + query, the target block, the answer)."""
    n, n_query = config.block_len, config.query_len
    target = "".join(rng.sample(ALPHABET, n))
    query = "".join(rng.sample(target, n_query))
    room = config.length - n - n_query - 1  # characters for the blocks (official pad_len arithmetic)
    n_blocks = math.ceil(room / (n + 1))
    blocks = {target}
    while len(blocks) < n_blocks:
        block = "".join(rng.sample(ALPHABET, n))
        if not set(query) <= set(block):
            blocks.add(block)
    ordered = sorted(blocks)  # a set's order is not reproducible; shuffle a sorted list instead
    rng.shuffle(ordered)
    text = ".".join(ordered)[:room] + "#" + query
    answer = {ToyOutput.all: target, ToyOutput.first: target[0], ToyOutput.last: target[-1]}[config.output]
    return text, target, answer


class ToyBlock(Task):
    name = "toy_block"

    def __init__(self, config: ToyBlockConfig, tokenizer: Tokenizer, seq_len: int):
        super().__init__(tokenizer, seq_len)
        self.config = config

    def example(self, split: str, index: int) -> Example:
        text, _, answer = make_puzzle(self.config, seeded(self.name, self.config.seed, split, index))
        prompt = [self.tokenizer.bos, *self.tokenizer.encode(text)]
        return Example.prompt_answer(prompt, [*self.tokenizer.encode(answer), self.tokenizer.eos])

    def train_example(self, index: int) -> Example:
        return self.example("train", index)

    def eval_examples(self) -> list[Example]:
        return [self.example("test", i) for i in range(self.config.eval_examples)]

    def metrics(self, tallies: dict[Cell, Tally]) -> dict[str, float]:
        """The paper's numbers: err_seq and err_tok over the held-out set (spec 3.4)."""
        total = Tally()
        for tally in tallies.values():
            total.add(tally)
        return {
            f"{self.name}/err_seq": 1 - total.examples_correct / total.examples,
            f"{self.name}/err_tok": 1 - total.tokens_correct / total.tokens,
        }
