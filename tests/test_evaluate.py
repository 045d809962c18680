"""Evaluation numbers against hand computations: loss, perplexity, bits per byte, task scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mta_lab.assembly.run_data import Corpus, RunData
from mta_lab.config import load_config
from mta_lab.data.datasets import Dataset, TokenSplit
from mta_lab.data.tokenizers import ByteTokenizer
from mta_lab.tasks.base import Example, Task
from mta_lab.train.evaluate import Evaluator, masked_mean_nll
from mta_lab.train.module import lr_factor

TOKENIZER = ByteTokenizer()


class Uniform(torch.nn.Module):
    """Equal logits for every id: the loss of every target is ln(vocab)."""

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, TOKENIZER.vocab_size)


class NextId(torch.nn.Module):
    """Predicts id + 1 after every id."""

    def forward(self, tokens):
        return torch.nn.functional.one_hot((tokens + 1) % TOKENIZER.vocab_size, TOKENIZER.vocab_size).float()


class FixedTask(Task):
    name = "fixed"

    def __init__(self, examples):
        super().__init__(TOKENIZER, 16)
        self.examples = examples

    def train_example(self, index):
        return self.examples[0]

    def eval_examples(self):
        return self.examples


def run_data(val_tokens, tasks=None) -> RunData:
    config = load_config("tiny", ["data.seq_len=8"])  # rows of 9 tokens
    split = TokenSplit([np.asarray(val_tokens)])
    corpus = Corpus("prose", 1.0, Dataset(None, {}), split, split)
    return RunData(config, TOKENIZER, {"prose": corpus}, tasks or {})


def test_loss_perplexity_and_bits_per_byte_by_hand():
    # Two rows of 9: targets are tokens 1..8 of each row; BOS/EOS targets stand for no bytes.
    row_a = [256, 10, 11, 12, 257, 256, 20, 21, 22]
    row_b = [23, 24, 257, 256, 30, 31, 32, 33, 257]
    evaluator = Evaluator(run_data(row_a + row_b + [0, 0, 0]), batches=1, batch_size=4)
    metrics = evaluator(Uniform(), torch.device("cpu"))
    targets = row_a[1:] + row_b[1:]
    assert sum(t < 256 for t in targets) == 11  # 11 of the 16 targets are bytes
    assert metrics["val/prose/loss"] == pytest.approx(math.log(260))
    assert metrics["val/prose/ppl"] == pytest.approx(260)
    assert metrics["val/prose/bpb"] == pytest.approx(16 * math.log(260) / (math.log(2) * 11))
    assert metrics["val/loss"] == metrics["val/prose/loss"] and metrics["val/bpb"] == metrics["val/prose/bpb"]


def test_teacher_forced_scoring_by_hand():
    # The model predicts id + 1. Example 1: answer 6, 7 after 5 -> both right. Example 2: answer
    # 9, 99 after 8 -> first right, second wrong. Example 3 (another length): 3 after 1 -> wrong.
    examples = [
        Example.prompt_answer([256, 4, 5], [6, 7], (("kind", "a"),)),
        Example.prompt_answer([256, 7, 8], [9, 99], (("kind", "a"),)),
        Example.prompt_answer([256, 1], [3], (("kind", "b"),)),
    ]
    evaluator = Evaluator(run_data(list(range(40)), {"fixed": FixedTask(examples)}), batches=1, batch_size=2)
    metrics = evaluator(NextId(), torch.device("cpu"))
    assert metrics["fixed/acc"] == pytest.approx(1 / 3)
    assert metrics["fixed/token_acc"] == pytest.approx(3 / 5)
    assert metrics["fixed/acc/kind_a"] == 0.5 and metrics["fixed/token_acc/kind_b"] == 0.0


def test_masked_loss_ignores_unscored_positions():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = 10.0  # confident and right at position 0, uniform elsewhere
    targets, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[True, False, False]])
    expected = -torch.log_softmax(logits[0, 0], -1)[1]
    assert masked_mean_nll(logits, targets, mask) == pytest.approx(expected.item())


def test_learning_rate_schedule_by_hand():
    config = load_config(
        "tiny", ["train.schedule.warmup_steps=10", "train.schedule.min_lr_ratio=0.1"]
    ).train.schedule
    assert lr_factor(0, 110, config) == pytest.approx(0.1) and lr_factor(9, 110, config) == pytest.approx(1.0)
    assert lr_factor(10, 110, config) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(109, 110, config) == pytest.approx(0.1)  # and ends at min_lr_ratio
    assert lr_factor(10 + 99 // 2, 110, config) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    )
    linear = load_config(
        "tiny", ["train.schedule.decay=linear", "train.schedule.min_lr_ratio=0.0"]
    ).train.schedule
    assert lr_factor(30 + 134, 300, linear) == pytest.approx(1 - 134 / 269)
    constant = load_config("tiny", ["train.schedule.decay=constant"]).train.schedule
    assert lr_factor(250, 300, constant) == 1.0
