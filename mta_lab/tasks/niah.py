"""Multi-needle needle-in-a-haystack (paper §4.3; Kamradt-style needles).

k needles "The magic number of <city> is <n>." are hidden in real text from a corpus split; the
question asks for one of them, whose insertion depth is the cell's depth (0 = start, 100 = end);
the others go to random depths. Cities and numbers are drawn per example, so the needles' order is
shuffled every time. The answer is " <n>" after "The magic number of <city> is".
"""

from __future__ import annotations

from mta_lab.config.data import NeedleConfig
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import Tokenizer
from mta_lab.tasks.base import Example, Task, seeded
from mta_lab.tasks.haystack import Haystack

CITIES = (
    "Amsterdam Athens Auckland Baghdad Bangkok Barcelona Beijing Berlin Bogota Boston Brussels Budapest "
    "Cairo Chicago Copenhagen Dakar Delhi Dublin Dubai Edinburgh Florence Geneva Hanoi Havana Helsinki "
    "Istanbul Jakarta Kabul Kyoto Lagos Lima Lisbon London Madrid Manila Marseille Melbourne Mexico Milan "
    "Montreal Moscow Mumbai Munich Nairobi Naples Oslo Paris Prague Quito Riga Rome Santiago Seoul "
    "Shanghai Singapore Stockholm Sydney Tokyo Toronto Vienna Warsaw Zurich"
).split()


class NeedleInAHaystack(Task):
    name = "niah"

    def __init__(
        self, config: NeedleConfig, tokenizer: Tokenizer, seq_len: int, haystacks: dict[str, Haystack]
    ):
        super().__init__(tokenizer, seq_len)
        self.config = config
        self.haystacks = haystacks
        """Filler text by split: "train" for training examples, "val" for evaluation."""

    def example(self, split: str, context: int, n_needles: int, depth: float, index: int) -> Example:
        """An example of exactly ``context`` tokens; the queried needle sits at ``depth`` percent."""
        rng = seeded(self.name, self.config.seed, split, context, n_needles, depth, index)
        cities = rng.sample(CITIES, n_needles)
        low = 10 ** (self.config.digits - 1)
        numbers = rng.sample(range(low, 10 * low), n_needles)
        needles = [
            self.tokenizer.encode(f" The magic number of {c} is {n}.\n")
            for c, n in zip(cities, numbers, strict=True)
        ]
        asked = rng.randrange(n_needles)
        question = self.tokenizer.encode(
            f"\nWhat is the magic number of {cities[asked]}? The magic number of {cities[asked]} is"
        )
        answer = self.tokenizer.encode(f" {numbers[asked]}")
        filler_len = context - 1 - sum(map(len, needles)) - len(question) - len(answer)
        if filler_len < 0:
            raise DataError(
                f"tasks.niah: {n_needles} needles and the question take {context - filler_len} tokens, more than a "
                f"context of {context}; use longer tasks.niah.contexts (and data.seq_len for training) or fewer needles"
            )
        depths = [rng.random() if i != asked else depth / 100 for i in range(n_needles)]
        haystack = self.haystacks[split]
        text = haystack.insert(haystack.take(filler_len, rng), needles, depths)
        cell = (("needles", n_needles), ("depth", int(depth)), ("context", context))
        return Example.prompt_answer([self.tokenizer.bos, *text, *question], answer, cell)

    def train_example(self, index: int) -> Example:
        rng = seeded(self.name, self.config.seed, "train-cell", index)
        n_needles = rng.choice(self.config.needles)
        return self.example("train", self.seq_len + 1, n_needles, 100 * rng.random(), index)

    def eval_examples(self) -> list[Example]:
        return [
            self.example("val", context, n_needles, depth, i)
            for context in self.config.contexts
            for n_needles in self.config.needles
            for depth in self.config.depths
            for i in range(self.config.eval_samples)
        ]
