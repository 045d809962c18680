"""Data configuration: tokenizer, text corpora, and the synthetic tasks mixed into training and scored.

Every training row is seq_len + 1 tokens and comes from one source, drawn by weight: a packed window of
a corpus (loss on every token) or one task example (loss on its answer only).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum

from mta_lab.config.model import _check

BUILTIN_CORPORA = ("shakespeare", "stdlib")


def cell_metric_names(dims: dict[str, list]) -> list[str]:
    """What a task scored by cells logs (``mta_lab.tasks.Task.metrics``): ``acc`` and ``token_acc``
    overall, per value of each dimension when there are several (``acc/depth_50``), and per cell
    (``acc/needles_4/depth_50``)."""
    cells = [[]]
    for key, values in dims.items():
        cells = [[*cell, f"{key}_{value}"] for cell in cells for value in values]
    suffixes = [""]
    if len(dims) > 1:
        suffixes += [f"/{key}_{value}" for key, values in dims.items() for value in values]
    suffixes += ["/" + "/".join(cell) for cell in cells if cell]
    return [f"{metric}{suffix}" for metric in ("acc", "token_acc") for suffix in suffixes]


class TokenizerKind(str, Enum):
    byte = "byte"
    """UTF-8 bytes plus BOS/EOS/PAD: 260 ids, no files, one token per byte."""
    bpe = "bpe"
    """Byte-level BPE trained locally on the training text (``tokenizers``), cached by corpus hash."""
    char = "char"
    """The toy task's 32-symbol alphabet (a-z . # _ BOS EOS PAD), as in the official toy code."""
    pretrained = "pretrained"
    """A pretrained model's own ``tokenizer.json`` (``path``; ``mta-lab import`` sets it), loaded
    offline, with the model's BOS and EOS ids (``bos_id``, ``eos_id``)."""


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = TokenizerKind.byte
    """``byte``, ``bpe`` or ``char``."""
    vocab_size: int = 4096
    """BPE vocabulary size, special tokens included (bpe only)."""
    path: str | None = None
    """A ``tokenizer.json``: a trained BPE to use instead of training one (bpe), or a pretrained
    model's (pretrained)."""
    bos_id: int | None = None
    """The pretrained tokenizer's beginning-of-sequence id (pretrained only)."""
    eos_id: int | None = None
    """The pretrained tokenizer's end-of-sequence id, also used to pad (pretrained only)."""

    def __post_init__(self) -> None:
        _check(
            self.vocab_size >= 260, "vocab_size", f"{self.vocab_size} must be >= 260 (256 bytes + specials)"
        )
        _check(
            self.path is None or self.kind in (TokenizerKind.bpe, TokenizerKind.pretrained),
            "path",
            f"a tokenizer file is used only with kind=bpe or pretrained, not kind={self.kind.value}",
        )
        pretrained = self.kind == TokenizerKind.pretrained
        _check(
            not pretrained or (self.path is not None and self.bos_id is not None and self.eos_id is not None),
            "path",
            "kind=pretrained needs path (its tokenizer.json), bos_id and eos_id (mta-lab import sets them)",
        )
        _check(
            pretrained or (self.bos_id is None and self.eos_id is None),
            "bos_id",
            f"bos_id and eos_id belong to kind=pretrained, not kind={self.kind.value}",
        )


@dataclass
class CorpusConfig:
    """A text corpus: built in (``shakespeare``, ``stdlib``) or prepared with ``mta-lab data prepare``."""

    weight: float = 1.0
    """Relative share of training rows."""
    path: str | None = None
    """Directory written by ``mta-lab data prepare``; null for a built-in corpus."""

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "weight", f"{self.weight} must be >= 0")


class ToyOutput(str, Enum):
    """What the toy task's answer is (paper Table 1 columns)."""

    all = "all"
    """The whole target block (the official code's task)."""
    first = "first"
    """Its first letter."""
    last = "last"
    """Its last letter."""


@dataclass
class ToyBlockConfig:
    """The paper's "find the block" task (spec 3): blocks of distinct letters joined by '.', then '#'
    and query letters; the answer is the unique block that holds all query letters."""

    block_len: int = 5
    """N: letters per block."""
    query_len: int = 2
    """L: query letters, all from the target block."""
    output: ToyOutput = ToyOutput.all
    """``all``, ``first`` or ``last``."""
    length: int = 319
    """Characters of blocks + '#' + query + full block (the official pad_len). The blocks get
    length - block_len - query_len - 1 characters, filled with whole blocks and cut there (the official
    arithmetic): unless that room + 1 is a multiple of block_len + 1 (319 for N=5, L=2; 49 fits 7
    blocks), the last block is cut short, and a target drawn last cannot be answered in full."""
    weight: float = 0.0
    """Share of training rows (0: evaluated only)."""
    eval_examples: int = 1000
    """Size of the fixed held-out set."""
    seed: int = 0
    """Seed of the generator (train and held-out streams are disjoint)."""

    def __post_init__(self) -> None:
        _check(2 <= self.block_len <= 26, "block_len", f"{self.block_len} must be in 2..26")
        _check(
            1 <= self.query_len <= self.block_len, "query_len", f"{self.query_len} must be in 1..block_len"
        )
        minimum = 2 * self.block_len + self.query_len + 2
        _check(
            self.length >= minimum,
            "length",
            f"{self.length} leaves no room for distractors (minimum {minimum})",
        )
        _check(self.weight >= 0, "weight", f"{self.weight} must be >= 0")
        _check(self.eval_examples >= 1, "eval_examples", f"{self.eval_examples} must be >= 1")

    def metric_names(self) -> list[str]:
        """What the task logs at each evaluation, after ``toy_block/``."""
        return ["err_seq", "err_tok"]


@dataclass
class NeedleConfig:
    """Multi-needle needle-in-a-haystack: k needles "The magic number of <city> is <n>." in real text
    from the corpora; the question asks for one of them, placed at a given depth."""

    weight: float = 0.0
    """Share of training rows (0: evaluated only); training examples fill a row of seq_len + 1."""
    needles: list[int] = field(default_factory=lambda: [2, 4, 6])
    """Numbers of needles per example."""
    depths: list[int] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    """Insertion depths (percent of the haystack) of the queried needle."""
    contexts: list[int] = field(default_factory=lambda: [512])
    """Evaluated context lengths in tokens; may exceed the training length."""
    eval_samples: int = 10
    """Examples per (needles, depth, context) cell."""
    digits: int = 5
    """Digits of the magic numbers."""
    seed: int = 0
    """Seed of the generator."""

    def __post_init__(self) -> None:
        _check(
            bool(self.needles) and all(n >= 1 for n in self.needles),
            "needles",
            f"{self.needles}: use counts >= 1",
        )
        _check(
            bool(self.depths) and all(0 <= d <= 100 for d in self.depths),
            "depths",
            f"{self.depths}: use 0..100",
        )
        _check(
            bool(self.contexts) and all(c >= 64 for c in self.contexts),
            "contexts",
            f"{self.contexts}: use >= 64",
        )
        _check(self.eval_samples >= 1, "eval_samples", f"{self.eval_samples} must be >= 1")
        _check(1 <= self.digits <= 9, "digits", f"{self.digits} must be in 1..9")
        _check(self.weight >= 0, "weight", f"{self.weight} must be >= 0")

    def metric_names(self) -> list[str]:
        """What the task logs at each evaluation, after ``niah/``."""
        return cell_metric_names(
            {"needles": self.needles, "depth": [int(d) for d in self.depths], "context": self.contexts}
        )


@dataclass
class BabiLongConfig:
    """BabiLong-style QA1-QA5 (bAbI templates generated here): supporting facts scattered in real text."""

    weight: float = 0.0
    """Share of training rows (0: evaluated only); training examples use ``train_distractors``."""
    tasks: list[str] = field(default_factory=lambda: ["qa1", "qa2", "qa3", "qa4", "qa5"])
    """Which of qa1 (one supporting fact), qa2 (two), qa3 (three), qa4 (two-argument relations),
    qa5 (three-argument relations)."""
    distractors: list[int] = field(default_factory=lambda: [0, 1024, 2048, 4096])
    """Evaluated amounts of distractor text, in tokens."""
    train_distractors: int = 0
    """Distractor tokens in training examples (capped to fit seq_len + 1)."""
    eval_samples: int = 10
    """Examples per (task, distractors) cell."""
    seed: int = 0
    """Seed of the generator."""

    def __post_init__(self) -> None:
        allowed = {"qa1", "qa2", "qa3", "qa4", "qa5"}
        unknown = sorted(set(self.tasks) - allowed)
        _check(
            bool(self.tasks) and not unknown, "tasks", f"{unknown or '[]'}: allowed qa1, qa2, qa3, qa4, qa5"
        )
        _check(
            bool(self.distractors) and all(d >= 0 for d in self.distractors), "distractors", "use counts >= 0"
        )
        _check(self.train_distractors >= 0, "train_distractors", f"{self.train_distractors} must be >= 0")
        _check(self.eval_samples >= 1, "eval_samples", f"{self.eval_samples} must be >= 1")
        _check(self.weight >= 0, "weight", f"{self.weight} must be >= 0")

    def metric_names(self) -> list[str]:
        """What the task logs at each evaluation, after ``babilong/``."""
        return cell_metric_names({"task": self.tasks, "distractors": self.distractors})


@dataclass
class MQARConfig:
    """Multi-query associative recall (Zoology): key-value pairs, then queries of the keys; each
    query must be answered with its value. Keys and values are single tokens."""

    weight: float = 0.0
    """Share of training rows (0: evaluated only)."""
    pairs: int = 16
    """Key-value pairs in training examples."""
    eval_pairs: list[int] = field(default_factory=lambda: [16, 32])
    """Evaluated numbers of pairs."""
    eval_lengths: list[int] = field(default_factory=lambda: [256])
    """Evaluated sequence lengths in tokens; may exceed the training length."""
    eval_samples: int = 20
    """Examples per (pairs, length) cell."""
    seed: int = 0
    """Seed of the generator."""

    def __post_init__(self) -> None:
        _check(self.pairs >= 1, "pairs", f"{self.pairs} must be >= 1")
        _check(
            bool(self.eval_pairs) and all(p >= 1 for p in self.eval_pairs), "eval_pairs", "use counts >= 1"
        )
        _check(bool(self.eval_lengths) and all(n >= 8 for n in self.eval_lengths), "eval_lengths", "use >= 8")
        _check(self.eval_samples >= 1, "eval_samples", f"{self.eval_samples} must be >= 1")
        _check(self.weight >= 0, "weight", f"{self.weight} must be >= 0")

    def metric_names(self) -> list[str]:
        """What the task logs at each evaluation, after ``mqar/``."""
        return cell_metric_names({"pairs": self.eval_pairs, "length": self.eval_lengths})


@dataclass
class TasksConfig:
    """Synthetic tasks; each is off (null) or mixed into training by its weight and evaluated."""

    toy_block: ToyBlockConfig | None = None
    """The paper's toy task."""
    niah: NeedleConfig | None = None
    """Multi-needle needle-in-a-haystack."""
    babilong: BabiLongConfig | None = None
    """BabiLong-style QA1-QA5."""
    mqar: MQARConfig | None = None
    """Multi-query associative recall."""

    def enabled(self) -> dict[str, ToyBlockConfig | NeedleConfig | BabiLongConfig | MQARConfig]:
        """The tasks that are on, by field name (the name `mta_lab.tasks.TASKS` builds them by)."""
        tasks = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: task for name, task in tasks.items() if task is not None}


@dataclass
class DataConfig:
    """What a run reads."""

    seq_len: int = 256
    """Tokens a training row predicts (rows hold seq_len + 1 tokens)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer of every corpus and task."""
    corpora: dict[str, CorpusConfig | None] = field(
        default_factory=lambda: {"shakespeare": CorpusConfig(), "stdlib": CorpusConfig()}
    )
    """Text corpora by name; validation is reported per corpus and averaged. A corpus set to null is
    removed; one with weight 0 is evaluated but not trained on."""
    val_fraction: float = 0.05
    """Share of a built-in corpus's documents held out for validation (split by document)."""
    seed: int = 0
    """Seed of the training data order."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 8, "seq_len", f"{self.seq_len} must be >= 8")
        _check(0 < self.val_fraction < 1, "val_fraction", f"{self.val_fraction} must be in (0, 1)")
        _check(0 <= self.seed < 2**32, "seed", f"{self.seed} must be in 0..4294967295")
        for name, corpus in self.active_corpora().items():
            _check(
                corpus.path is not None or name in BUILTIN_CORPORA,
                f"corpora.{name}.path",
                f"'{name}' is not a built-in corpus ({', '.join(BUILTIN_CORPORA)}); "
                "give the path of a dataset made by `mta-lab data prepare`",
            )

    def active_corpora(self) -> dict[str, CorpusConfig]:
        return {name: corpus for name, corpus in self.corpora.items() if corpus is not None}
