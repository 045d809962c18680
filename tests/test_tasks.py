"""Generator invariants of the toy task, needle-in-a-haystack and MQAR, checked by parsing their
output independently (BabiLong has its own file)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mta_lab.config.data import MQARConfig, NeedleConfig, ToyBlockConfig, ToyOutput
from mta_lab.data.datasets import TokenSplit
from mta_lab.data.documents import builtin_documents
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import ByteTokenizer, CharTokenizer
from mta_lab.tasks.base import Tally
from mta_lab.tasks.haystack import Haystack
from mta_lab.tasks.mqar import MQAR
from mta_lab.tasks.niah import NeedleInAHaystack
from mta_lab.tasks.toy_block import ToyBlock

BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def haystacks():
    text = "".join(doc.text for doc in builtin_documents("shakespeare")[:3])
    split = TokenSplit([np.array([BYTES.bos, *BYTES.encode(text), BYTES.eos], dtype=np.uint16)])
    return {"train": Haystack(split, BYTES, "shakespeare"), "val": Haystack(split, BYTES, "shakespeare")}


@pytest.mark.parametrize(
    ("block_len", "output"), [(5, "all"), (5, "first"), (5, "last"), (8, "all"), (3, "all")]
)
def test_toy_block_has_exactly_one_target(block_len, output):
    config = ToyBlockConfig(block_len=block_len, output=ToyOutput(output), eval_examples=40)
    tokenizer = CharTokenizer()
    task = ToyBlock(config, tokenizer, seq_len=320)
    for example in task.eval_examples() + [task.train_example(i) for i in range(40)]:
        tokens = example.tokens
        assert tokens[0] == tokenizer.bos and tokens[-1] == tokenizer.eos
        answer_start = example.scored[0]
        text, answer = tokenizer.decode(tokens[1:answer_start]), tokenizer.decode(tokens[answer_start:-1])
        blocks, query = text.split("#")
        blocks = blocks.split(".")
        assert len(query) == config.query_len and len(set(query)) == config.query_len
        whole = [b for b in blocks if len(b) == block_len]
        assert all(len(set(b)) == block_len for b in whole)  # distinct letters per block
        holders = [b for b in whole if set(query) <= set(b)]
        assert len(holders) <= 1  # distractors never hold all query letters
        if holders:
            target = holders[0]
            assert answer == {"all": target, "first": target[0], "last": target[-1]}[output]
        else:
            # The official quirk (spec 3.1): with N=8 the blocks are cut to fit, and a target drawn
            # last is only partly visible.
            assert block_len == 8 and len(blocks[-1]) < block_len and answer.startswith(blocks[-1])
        assert example.scored == list(range(answer_start, len(tokens)))  # the answer and EOS
        if output == "all":
            assert len(text) + len(answer) == config.length  # the official 319 characters


def test_toy_block_matches_the_official_layout():
    """N=5, L=2: 52 blocks, 311 characters, input 314 + label 5 = 319, 321 tokens (spec 3.1-3.2)."""
    example = ToyBlock(ToyBlockConfig(), CharTokenizer(), 320).train_example(0)
    text = CharTokenizer().decode(example.tokens[1 : example.scored[0]])
    assert text.count(".") == 51 and len(text) == 314 and len(example.tokens) == 321


def test_toy_train_and_test_sets_differ():
    task = ToyBlock(ToyBlockConfig(eval_examples=200), CharTokenizer(), 320)
    test = {tuple(e.tokens) for e in task.eval_examples()}
    assert len(test) == 200 and test.isdisjoint(tuple(task.train_example(i).tokens) for i in range(200))


NEEDLE = re.compile(r"The magic number of (\w+) is (\d+)\.")


@pytest.mark.parametrize("n_needles", [1, 2, 5])
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_niah_answer_is_in_the_text_at_the_asked_depth(haystacks, n_needles, depth):
    config = NeedleConfig(needles=[n_needles], depths=[depth], contexts=[2048], eval_samples=3)
    task = NeedleInAHaystack(config, BYTES, 256, haystacks)
    for example in task.eval_examples():
        assert len(example.tokens) == 2048 and dict(example.cell) == {
            "needles": n_needles,
            "depth": depth,
            "context": 2048,
        }
        prompt = BYTES.decode(example.tokens[: example.scored[0]])
        answer = BYTES.decode(example.tokens[example.scored[0] :])
        haystack, question = prompt.rsplit("\nWhat is the magic number of ", 1)
        needles = NEEDLE.findall(haystack)
        assert len(needles) == n_needles and len({city for city, _ in needles}) == n_needles
        city = question.split("?")[0]
        assert answer == " " + dict(needles)[city]  # recoverable from the text
        position = haystack.index(f"The magic number of {city} is") / len(haystack)
        if depth == 0:
            assert NEEDLE.search(haystack).group(1) == city and position < 0.01
        elif depth == 100:
            assert needles[-1][0] == city and position > 0.95
        else:
            assert abs(position - 0.5) < 0.2


def test_niah_training_examples_fill_a_row_and_vary(haystacks):
    task = NeedleInAHaystack(NeedleConfig(needles=[2, 3]), BYTES, 511, haystacks)
    examples = [task.train_example(i) for i in range(20)]
    assert all(len(e.tokens) == 512 for e in examples)
    assert len({e.cell for e in examples}) > 5  # needle counts and depths vary
    with pytest.raises(DataError, match="tasks.niah: 3 needles and the question take"):
        NeedleInAHaystack(NeedleConfig(needles=[3]), BYTES, 100, haystacks).train_example(0)


@pytest.mark.parametrize(("pairs", "length"), [(4, 32), (16, 256), (30, 121)])
def test_mqar_queries_ask_for_the_paired_values(pairs, length):
    task = MQAR(MQARConfig(pairs=pairs, eval_pairs=[pairs], eval_lengths=[length], eval_samples=5), BYTES, 63)
    for example in task.eval_examples():
        tokens = example.tokens
        assert len(tokens) == length and tokens[0] == BYTES.bos
        kv = dict(zip(tokens[1 : 1 + 2 * pairs : 2], tokens[2 : 2 + 2 * pairs : 2], strict=True))
        assert len(kv) == pairs and set(kv).isdisjoint(kv.values())
        assert not set(kv) & set(BYTES.special_ids) and not set(kv.values()) & set(BYTES.special_ids)
        assert len(example.scored) == pairs and min(example.scored) > 2 * pairs
        queried = [tokens[i - 1] for i in example.scored]
        assert sorted(queried) == sorted(kv)  # every key asked once
        assert all(tokens[i] == kv[tokens[i - 1]] for i in example.scored)
        rest = [
            t
            for i, t in enumerate(tokens[1 + 2 * pairs :], start=1 + 2 * pairs)
            if i not in example.scored and i + 1 not in example.scored
        ]
        assert set(rest) <= {BYTES.pad}


def test_mqar_refuses_more_pairs_than_symbols():
    with pytest.raises(DataError, match="tokenizer has 14 of each"):
        MQAR(MQARConfig(pairs=16), CharTokenizer(), 320)


def test_metric_names_and_values_per_cell():
    task = MQAR(MQARConfig(), BYTES, 255)
    tallies = {
        (("pairs", 8), ("length", 64)): Tally(examples=4, examples_correct=1, tokens=32, tokens_correct=20),
        (("pairs", 8), ("length", 128)): Tally(examples=4, examples_correct=3, tokens=32, tokens_correct=30),
    }
    metrics = task.metrics(tallies)
    assert metrics["mqar/acc"] == 4 / 8 and metrics["mqar/token_acc"] == 50 / 64
    assert metrics["mqar/acc/length_64"] == 1 / 4 and metrics["mqar/acc/pairs_8"] == 4 / 8
    assert metrics["mqar/token_acc/pairs_8/length_128"] == 30 / 32
    toy = ToyBlock(ToyBlockConfig(), CharTokenizer(), 320).metrics({(): Tally(10, 7, 60, 55)})
    assert toy == {"toy_block/err_seq": pytest.approx(0.3), "toy_block/err_tok": pytest.approx(5 / 60)}


def test_every_task_logs_exactly_the_metrics_its_config_declares():
    # What a sweep may name as its metric is checked against the configs' declared names before
    # anything trains; here the tasks themselves score their held-out sets and say what they log.
    from mta_lab.assembly.run_data import load_run_data
    from mta_lab.config import load_config

    config = load_config(
        "tiny",
        [
            "model.max_seq_len=2048",
            "tasks.toy_block={length: 49, eval_examples: 3}",
            "tasks.niah={needles: [2, 4], contexts: [384, 512], eval_samples: 1}",
            "tasks.babilong={distractors: [0, 256], eval_samples: 1, tasks: [qa1, qa2]}",
            "tasks.mqar={eval_pairs: [4, 8], eval_lengths: [64], eval_samples: 1}",
        ],
    )
    run_data = load_run_data(config)
    logged = set()
    for name, task in run_data.tasks.items():
        tallies = {example.cell: Tally(1, 1, 1, 1) for example in run_data.eval_examples[name]}
        logged |= set(task.metrics(tallies))
    declared = {m for m in config.logged_metrics() if m.split("/")[0] in run_data.tasks}
    assert logged == declared and "niah/acc/needles_4/depth_50/context_512" in declared


def test_every_task_config_has_a_task_and_every_task_a_config():
    import dataclasses

    from mta_lab.config.data import TasksConfig
    from mta_lab.tasks import TASKS

    assert [f.name for f in dataclasses.fields(TasksConfig)] == list(TASKS)
