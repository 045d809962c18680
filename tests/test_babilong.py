"""BabiLong-style QA1-QA5: every answer recomputed from the decoded text by the test's own reading of
the story, the facts' layout in exactly the asked amount of corpus text, determinism, the train/eval
split, training rows, and metric names."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from mta_lab.config.data import BabiLongConfig
from mta_lab.data.datasets import TokenSplit
from mta_lab.data.documents import builtin_documents
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import ByteTokenizer
from mta_lab.tasks import babilong
from mta_lab.tasks.babilong import BabiLong
from mta_lab.tasks.base import Example, Tally
from mta_lab.tasks.haystack import Haystack

TASKS = ("qa1", "qa2", "qa3", "qa4", "qa5")
FACT_RANGE = {"qa1": (2, 6), "qa2": (4, 10), "qa3": (6, 14), "qa4": (2, 2), "qa5": (3, 8)}
"""Facts per story, as bAbI-sized stories that fit small models."""

# The story grammar, written out here rather than taken from the generator.
MOVE = re.compile(r"(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.")
GRAB = re.compile(r"(\w+) (?:picked up|got|grabbed|took) the (\w+)\.")
DROP = re.compile(r"(\w+) (?:dropped|put down|discarded|left) the (\w+)\.")
GIVE = re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.")
NEXT_TO = re.compile(r"The (\w+) is (north|south|east|west) of the (\w+)\.")
PROMPT = re.compile(r"((?: [^\n]+\n)+)\nQuestion: ([^\n]+)\nAnswer:")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
OFFSET = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}


@pytest.fixture(scope="module")
def tok() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return builtin_documents("shakespeare")[0].text[:50_000]


@pytest.fixture(scope="module")
def haystacks(tok, corpus_text) -> dict[str, Haystack]:
    split = TokenSplit([np.array([tok.bos, *tok.encode(corpus_text), tok.eos], dtype=np.uint16)])
    return {"train": Haystack(split, tok, "shakespeare"), "val": Haystack(split, tok, "shakespeare")}


def make_task(tok, haystacks, seq_len: int = 2048, **fields) -> BabiLong:
    return BabiLong(BabiLongConfig(**fields), tok, seq_len, haystacks)


def read(tok, example: Example) -> tuple[list[str], str, str]:
    """(facts, question, answer) of an example without distractors, from its decoded tokens only."""
    assert example.tokens[0] == tok.bos and tok.bos not in example.tokens[1:]
    start = example.scored[0]
    assert example.scored == list(range(start, len(example.tokens)))
    match = PROMPT.fullmatch(tok.decode(example.tokens[1:start]))
    assert match, tok.decode(example.tokens)
    facts = [line[1:] for line in match.group(1).splitlines()]
    answer = tok.decode(example.tokens[start:])
    assert re.fullmatch(r" [A-Za-z]+", answer), f"answer {answer!r} is not one word after a space"
    return facts, match.group(2), answer[1:]


class Replay:
    """The test's own simulation of a qa1/2/3/5 story: it checks every fact is possible in the state
    so far (no contradiction) and tracks where everything is."""

    def __init__(self) -> None:
        self.at: dict[str, str] = {}
        self.carrier: dict[str, str] = {}
        self.lying: dict[str, str] = {}
        self.visits: dict[str, list[str]] = {}
        self.gives: list[tuple[str, str, str]] = []

    def apply(self, fact: str) -> None:
        if match := MOVE.fullmatch(fact):
            person, place = match.groups()
            assert self.at.get(person) != place, f"{fact}: already there"
            self.at[person] = place
            for obj in [o for o, p in self.carrier.items() if p == person]:
                self.visit(obj, place)
        elif match := GRAB.fullmatch(fact):
            person, obj = match.groups()
            assert person in self.at, f"{fact}: {person} is nowhere yet"
            assert obj not in self.carrier, f"{fact}: {self.carrier.get(obj)} holds it"
            assert self.lying.get(obj, self.at[person]) == self.at[person], f"{fact}: it lies elsewhere"
            self.lying.pop(obj, None)
            self.carrier[obj] = person
            self.visit(obj, self.at[person])
        elif match := DROP.fullmatch(fact):
            person, obj = match.groups()
            assert self.carrier.get(obj) == person, f"{fact}: {person} does not hold it"
            del self.carrier[obj]
            self.lying[obj] = self.at[person]
        elif match := GIVE.fullmatch(fact):
            giver, obj, receiver = match.groups()
            assert self.carrier.get(obj) == giver, f"{fact}: {giver} does not hold it"
            assert giver != receiver and self.at.get(receiver) == self.at[giver], f"{fact}: not together"
            self.carrier[obj] = receiver
            self.gives.append((giver, obj, receiver))
        else:
            raise AssertionError(f"not a fact of these stories: {fact!r}")

    def visit(self, obj: str, place: str) -> None:
        places = self.visits.setdefault(obj, [])
        if not places or places[-1] != place:
            places.append(place)

    def where(self, thing: str) -> str | None:
        if thing in self.carrier:
            return self.at[self.carrier[thing]]
        return self.at.get(thing) or self.lying.get(thing)


def solve_world(facts: list[str], question: str) -> set[str]:
    """Every answer the story allows for a qa1/2/3/5 question."""
    replay = Replay()
    for fact in facts:
        replay.apply(fact)
    if match := re.fullmatch(r"Where is (?:the )?(\w+)\?", question):
        place = replay.where(match.group(1))
        return {place} if place else set()
    if match := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        places = replay.visits.get(match.group(1), [])
        if places.count(match.group(2)) != 1:
            return set()  # not there, or there twice: no single answer
        return {places[i - 1] for i in range(1, len(places)) if places[i] == match.group(2)}
    gives = replay.gives
    if match := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        return {g for g, o, r in gives if (o, r) == match.groups()}
    if match := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        return {r for g, o, r in gives if (g, o) == match.groups()}
    if match := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        return {o for g, o, r in gives if (g, r) == match.groups()}
    raise AssertionError(f"not a question of these stories: {question!r}")


def solve_relations(facts: list[str], question: str) -> set[str]:
    """Every answer the stated neighbours allow for a qa4 question; also checks that the facts place
    the rooms on a grid without contradiction."""
    stated = set()
    for fact in facts:
        match = NEXT_TO.fullmatch(fact)
        assert match, f"not a relation: {fact!r}"
        place, direction, other = match.groups()
        stated |= {(place, direction, other), (other, OPPOSITE[direction], place)}
    cells = {next(iter(stated))[2]: (0, 0)}
    while len(cells) < len({p for p, _, _ in stated}):
        for place, direction, other in stated:
            if other in cells and place not in cells:
                cells[place] = (
                    cells[other][0] + OFFSET[direction][0],
                    cells[other][1] + OFFSET[direction][1],
                )
    for place, direction, other in stated:
        expected = (cells[other][0] + OFFSET[direction][0], cells[other][1] + OFFSET[direction][1])
        assert cells[place] == expected, f"contradictory relations: {facts}"
    assert len(set(cells.values())) == len(cells), f"two rooms in one place: {facts}"
    if match := re.fullmatch(r"What is (north|south|east|west) of the (\w+)\?", question):
        return {p for p, d, o in stated if (d, o) == match.groups()}
    if match := re.fullmatch(r"What is the (\w+) (north|south|east|west) of\?", question):
        return {o for p, d, o in stated if (p, d) == match.groups()}
    raise AssertionError(f"not a question of these stories: {question!r}")


@pytest.mark.parametrize("task_name", TASKS)
def test_answers_follow_from_the_facts(tok, haystacks, task_name):
    task = make_task(tok, haystacks)
    counts = Counter()
    for split in ("train", "val"):
        for index in range(150):
            facts, question, answer = read(tok, task.example(split, task_name, 0, index))
            solve = solve_relations if task_name == "qa4" else solve_world
            assert solve(facts, question) == {answer}, (facts, question, answer)
            assert any(re.search(rf"\b{answer}\b", fact) for fact in facts), "answer not in the story"
            counts[len(facts)] += 1
    low, high = FACT_RANGE[task_name]
    assert low <= min(counts) and max(counts) <= high, counts
    assert len(counts) > (high - low) // 2, f"fact counts barely vary: {counts}"


QUESTION_KINDS = {
    "qa1": [r"Where is [A-Z]\w+\?"],
    "qa2": [r"Where is the \w+\?"],
    "qa3": [r"Where was the \w+ before the \w+\?"],
    "qa4": [
        r"What is (?:north|south|east|west) of the \w+\?",
        r"What is the \w+ (?:north|south|east|west) of\?",
    ],
    "qa5": [r"Who gave the \w+ to \w+\?", r"Who did \w+ give the \w+ to\?", r"What did \w+ give to \w+\?"],
}


@pytest.mark.parametrize("task_name", TASKS)
def test_every_kind_of_question_is_asked(tok, haystacks, task_name):
    task = make_task(tok, haystacks)
    seen = Counter()
    for index in range(100):
        _, question, _ = read(tok, task.example("val", task_name, 0, index))
        kinds = [k for k in QUESTION_KINDS[task_name] if re.fullmatch(k, question)]
        assert len(kinds) == 1, question
        seen[kinds[0]] += 1
    assert set(seen) == set(QUESTION_KINDS[task_name]) and min(seen.values()) >= 10, seen


def test_qa5_never_asks_a_question_with_two_answers(monkeypatch):
    """Ambiguous gives are too rare in random stories (about 1 in 5000) to be caught by sampling, so
    the question choice gets a story made to hold them: the milk goes Jeff -> Fred -> Jeff -> Bill ->
    Fred, so "Who gave the milk to Fred?" and "Who did Jeff give the milk to?" have two answers."""
    world = babilong.World()
    for person in ("Jeff", "Fred", "Bill"):
        world.do("move", (person, "kitchen"))
    world.do("grab", ("Jeff", "milk"))
    for give in (
        ("Jeff", "milk", "Fred"),
        ("Fred", "milk", "Jeff"),
        ("Jeff", "milk", "Bill"),
        ("Bill", "milk", "Fred"),
    ):
        world.do("give", give)
    monkeypatch.setattr(babilong, "simulate", lambda task, rng, n_facts: (world, ["(facts)"]))
    asked = {}
    for seed in range(300):
        story = babilong.draw_qa5(random.Random(seed), 8)
        asked[story.question] = story.answer
    assert asked == {
        "Who gave the milk to Jeff?": "Fred",
        "Who gave the milk to Bill?": "Jeff",
        "Who did Fred give the milk to?": "Jeff",
        "Who did Bill give the milk to?": "Fred",
        "What did Jeff give to Fred?": "milk",
        "What did Fred give to Jeff?": "milk",
        "What did Jeff give to Bill?": "milk",
        "What did Bill give to Fred?": "milk",
    }


@pytest.mark.parametrize("task_name", TASKS)
def test_facts_sit_in_order_in_exactly_the_distractor_tokens(tok, haystacks, corpus_text, task_name):
    task = make_task(tok, haystacks)
    corpus = corpus_text.encode("utf-8")
    gaps = 0
    for index in range(4):
        bare = task.example("val", task_name, 0, index)
        facts, _, _ = read(tok, bare)
        tail = bare.tokens[1 + sum(len(f) + 2 for f in facts) :]  # question and answer
        for distractors in (1, 37, 600):
            example = task.example("val", task_name, distractors, index)
            assert len(example.tokens) == len(bare.tokens) + distractors
            assert example.tokens[0] == tok.bos and example.tokens[-len(tail) :] == tail
            assert example.scored == [
                len(example.tokens) - len(bare.scored) + i for i in range(len(bare.scored))
            ]
            assert example.cell == (("task", task_name), ("distractors", distractors))
            body = bytes(example.tokens[1 : -len(tail)])
            rest, cursor = b"", 0
            for fact in facts:  # each fact after the previous one: story order
                position = body.find(f" {fact}\n".encode(), cursor)
                assert position >= 0, f"{fact!r} missing or out of order"
                gaps += position > cursor
                rest += body[cursor:position]
                cursor = position + len(fact) + 2
            rest += body[cursor:]
            assert len(rest) == distractors
            assert corpus.find(rest) >= 0, "the distractors are not a run of corpus text"
    assert gaps > 0, "facts were never scattered"


@pytest.mark.parametrize("task_name", TASKS)
def test_examples_are_deterministic_and_vary(tok, haystacks, task_name):
    first, second = make_task(tok, haystacks, seed=3), make_task(tok, haystacks, seed=3)
    assert first.example("val", task_name, 100, 7) == second.example("val", task_name, 100, 7)
    assert first.example("train", task_name, 0, 7) == second.example("train", task_name, 0, 7)
    stories = [tuple(first.example("val", task_name, 0, i).tokens) for i in range(30)]
    assert len(set(stories)) == len(stories)
    other_seed = make_task(tok, haystacks, seed=4)
    assert other_seed.example("val", task_name, 0, 7) != first.example("val", task_name, 0, 7)
    assert first.example("train", task_name, 0, 7) != first.example("val", task_name, 0, 7)


def test_training_and_evaluation_stories_are_disjoint(tok, haystacks):
    """qa4's story space is small: without a split, hundreds of draws on each side would collide."""
    task = make_task(tok, haystacks)
    for task_name in ("qa1", "qa4"):
        train = {tuple(task.example("train", task_name, 0, i).tokens) for i in range(500)}
        val = {tuple(task.example("val", task_name, 0, i).tokens) for i in range(500)}
        assert not train & val


def test_eval_examples_cover_every_cell(tok, haystacks):
    task = make_task(tok, haystacks, tasks=["qa2", "qa5"], distractors=[0, 64], eval_samples=3)
    examples = task.eval_examples()
    cells = Counter(example.cell for example in examples)
    assert cells == {(("task", t), ("distractors", d)): 3 for t in ("qa2", "qa5") for d in (0, 64)}
    by_cell = {}
    for example in examples:
        by_cell.setdefault(example.cell, []).append(example)
    for t in ("qa2", "qa5"):
        for bare, long in zip(
            by_cell[(("task", t), ("distractors", 0))],
            by_cell[(("task", t), ("distractors", 64))],
            strict=True,
        ):
            assert len(long.tokens) == len(bare.tokens) + 64
            assert long.tokens[-len(bare.scored) :] == bare.tokens[-len(bare.scored) :]  # the same story
    assert examples == task.eval_examples()
    training = {tuple(task.example("train", t, 0, i).tokens) for t in ("qa2", "qa5") for i in range(50)}
    assert not training & {tuple(example.tokens) for example in examples}, (
        "evaluation reuses training stories"
    )


def test_training_examples_fill_a_row(tok, haystacks):
    seq_len = 400
    task = make_task(
        tok, haystacks, seq_len=seq_len, tasks=["qa1", "qa4"], train_distractors=5000, weight=1.0
    )
    seen = Counter()
    for index in range(40):
        example = task.train_example(index)
        assert len(example.tokens) == seq_len + 1  # distractors cut to fill the row exactly
        name, distractors = example.cell[0][1], example.cell[1][1]
        seen[name] += 1
        bare = task.example("train", name, 0, index)
        assert distractors == seq_len + 1 - len(bare.tokens)
        assert example.tokens[-len(bare.scored) :] == bare.tokens[-len(bare.scored) :]
    assert set(seen) == {"qa1", "qa4"} and min(seen.values()) >= 5

    few = make_task(tok, haystacks, seq_len=seq_len, tasks=["qa1"], train_distractors=16)
    for index in range(10):
        example = few.train_example(index)
        assert len(example.tokens) == len(few.example("train", "qa1", 0, index).tokens) + 16
        assert example.cell == (("task", "qa1"), ("distractors", 16))
        assert example.row(seq_len + 1, tok.pad)[0].shape == (seq_len + 1,)


def test_a_story_longer_than_a_row_is_a_data_error(tok, haystacks):
    task = make_task(tok, haystacks, seq_len=100, tasks=["qa3"])  # weight 0: built, checked per example
    for index in range(3):
        needed = len(task.example("train", "qa3", 0, index).tokens)
        assert needed > 101
        with pytest.raises(
            DataError, match=rf"needs {needed} tokens.*data\.seq_len \+ 1 = 101.*at least {needed - 1}"
        ):
            task.train_example(index)


def test_training_refuses_a_seq_len_some_story_would_exceed(tok, haystacks):
    with pytest.raises(
        DataError, match=r"qa3 stories .* reach (\d+) tokens.*data\.seq_len \+ 1 = 301"
    ) as error:
        make_task(tok, haystacks, seq_len=300, weight=1.0, tasks=["qa1", "qa3"])  # qa1 fits, qa3 does not
    bound = int(re.search(r"reach (\d+) tokens", str(error.value)).group(1))
    evaluated_only = make_task(tok, haystacks, seq_len=300)
    longest = max(
        len(evaluated_only.example(split, "qa3", 0, i).tokens)
        for split in ("train", "val")
        for i in range(300)
    )
    assert 300 < longest <= bound  # an upper bound, and not a wild one
    assert bound < 1.5 * longest
    make_task(tok, haystacks, seq_len=bound - 1, weight=1.0, tasks=["qa1", "qa3"])  # exactly enough
    with pytest.raises(DataError, match=rf"at least {bound - 1}"):
        make_task(tok, haystacks, seq_len=bound - 2, weight=1.0, tasks=["qa1", "qa3"])


def test_metrics_per_cell_and_dimension(tok, haystacks):
    task = make_task(tok, haystacks)
    tallies = {
        (("task", "qa1"), ("distractors", 0)): Tally(
            examples=4, examples_correct=3, tokens=8, tokens_correct=7
        ),
        (("task", "qa1"), ("distractors", 1024)): Tally(
            examples=4, examples_correct=1, tokens=8, tokens_correct=4
        ),
        (("task", "qa2"), ("distractors", 0)): Tally(
            examples=2, examples_correct=2, tokens=2, tokens_correct=2
        ),
    }
    metrics = task.metrics(tallies)
    expected_acc = {
        "": 6 / 10,
        "/task_qa1": 4 / 8,
        "/task_qa2": 1.0,
        "/distractors_0": 5 / 6,
        "/distractors_1024": 1 / 4,
        "/task_qa1/distractors_0": 3 / 4,
        "/task_qa1/distractors_1024": 1 / 4,
        "/task_qa2/distractors_0": 1.0,
    }
    expected_token_acc = {
        "": 13 / 18,
        "/task_qa1": 11 / 16,
        "/task_qa2": 1.0,
        "/distractors_0": 9 / 10,
        "/distractors_1024": 4 / 8,
        "/task_qa1/distractors_0": 7 / 8,
        "/task_qa1/distractors_1024": 4 / 8,
        "/task_qa2/distractors_0": 1.0,
    }
    expected = {f"babilong/acc{k}": v for k, v in expected_acc.items()}
    expected |= {f"babilong/token_acc{k}": v for k, v in expected_token_acc.items()}
    assert metrics == pytest.approx(expected)
