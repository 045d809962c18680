"""BabiLong-style question answering (BabiLong, Kuratov et al. 2024): the supporting facts of a short
bAbI story (Weston et al. 2015) are scattered, in order, through real text; then comes a question
whose one-word answer the facts fix.

Stories are generated here from bAbI's templates, QA1-QA5:

- qa1, one supporting fact: people move between places; "Where is Mary?"
- qa2, two supporting facts: people also pick up and drop objects; "Where is the football?"
- qa3, three supporting facts: "Where was the apple before the kitchen?" (the object's previous place)
- qa4, two-argument relations: "The office is north of the bedroom."; "What is north of the bedroom?"
- qa5, three-argument relations: "Mary gave the cake to Fred."; "Who gave the cake to Fred?"

Each story is the trace of a small world simulation (who is where, who holds what), so it never
contradicts itself, and a question is asked only when the facts give it exactly one answer. A story
depends on (seed, split, task, index) but not on the amount of distractor text, so accuracy across
distractor amounts compares the same stories, as BabiLong does. Training and evaluation stories are
disjoint: a stable hash of the story's text assigns it to one side.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

from mta_lab.config.data import BabiLongConfig
from mta_lab.data.errors import DataError
from mta_lab.data.tokenizers import Tokenizer
from mta_lab.tasks.base import Example, Task, seeded
from mta_lab.tasks.haystack import Haystack

PEOPLE = ("Mary", "John", "Daniel", "Sandra")
"""The actors of qa1-qa3 (bAbI's names)."""
GIVERS = ("Mary", "Fred", "Jeff", "Bill")
"""The actors of qa5 (bAbI's names)."""
PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk")
"""The objects of qa2 and qa3."""
GIFTS = ("apple", "cake", "football", "milk")
"""The objects of qa5."""
VERBS = {
    "move": ("moved to", "went to", "journeyed to", "travelled to", "went back to"),
    "grab": ("picked up", "got", "grabbed", "took"),
    "drop": ("dropped", "put down", "discarded", "left"),
    "give": ("gave", "handed", "passed"),
}
"""Synonyms of each action: the model must read what a verb means, not spot one fixed word."""
KINDS = {
    "qa1": ("move",),
    "qa2": ("move", "grab", "drop"),
    "qa3": ("move", "grab", "drop"),
    "qa5": ("move", "grab", "give"),
}
"""The actions a story of each simulated task is made of."""
CAST = {"qa1": (PEOPLE, ()), "qa2": (PEOPLE, OBJECTS), "qa3": (PEOPLE, OBJECTS), "qa5": (GIVERS, GIFTS)}
"""The people and objects of each simulated task."""
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
STEP = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
"""Grid offset of each direction: qa4's places sit on a grid, so its relations never contradict."""
QUESTIONS = {
    "qa1": ("Where is {person}?",),
    "qa2": ("Where is the {obj}?",),
    "qa3": ("Where was the {obj} before the {place}?",),
    "qa4": ("What is {direction} of the {place}?", "What is the {place} {direction} of?"),
    "qa5": (
        "Who gave the {obj} to {receiver}?",
        "Who did {giver} give the {obj} to?",
        "What did {giver} give to {receiver}?",
    ),
}
"""Question templates per task; their fields are filled from the task's vocabulary."""
FACT_COUNTS = {"qa1": (2, 6), "qa2": (4, 10), "qa3": (6, 14), "qa4": (2, 2), "qa5": (4, 8)}
"""Fewest and most facts per story (inclusive). qa5 needs four: two people meet, one picks up, gives."""
MAX_DRAWS = 10_000
"""Simulations tried per story. A draw is rejected when no question has a unique answer, or when the
story belongs to the other side of the train/eval split; the worst acceptance rate is about 1%."""


@dataclass(frozen=True)
class Story:
    facts: list[str]
    """Sentences in story order, e.g. "Mary moved to the bathroom."."""
    question: str
    answer: str
    """One word."""

    def held_out(self) -> bool:
        """Whether the story belongs to the evaluation side. A stable hash splits the story space in two,
        so no training story (facts, question and answer) is ever evaluated: qa4's space is small enough
        that independent draws would repeat."""
        text = "\n".join([*self.facts, self.question, self.answer])
        return zlib.crc32(text.encode("utf-8")) % 2 == 1


def sentence(kind: str, verb: str, args: tuple[str, ...]) -> str:
    """The fact of an action: ("move", "went to", ("Mary", "garden")) -> "Mary went to the garden."."""
    if kind == "give":
        giver, obj, receiver = args
        return f"{giver} {verb} the {obj} to {receiver}."
    subject, target = args
    return f"{subject} {verb} the {target}."


def relation(place: str, direction: str, other: str) -> str:
    return f"The {place} is {direction} of the {other}."


class World:
    """The state behind a story of qa1-qa3 and qa5 (bAbI's world simulation): where each person is,
    who carries each object, where dropped objects lie, and every place each object has been. A fact
    is only ever made from an action that is legal in the current state."""

    def __init__(self) -> None:
        self.location: dict[str, str] = {}
        """Person -> place, once the person has moved somewhere."""
        self.holder: dict[str, str] = {}
        """Object -> the person carrying it."""
        self.floor: dict[str, str] = {}
        """Object -> the place where it was dropped."""
        self.trail: dict[str, list[str]] = {}
        """Object -> the places it has been in, oldest first (never the same place twice in a row)."""
        self.gives: list[tuple[str, str, str]] = []
        """(giver, object, receiver) of every give, in story order."""

    def where(self, thing: str) -> str | None:
        """A person's place, or an object's (its carrier's place, or where it lies); None if unknown."""
        if thing in self.holder:
            return self.location[self.holder[thing]]
        return self.location.get(thing, self.floor.get(thing))

    def legal(self, kind: str, people: tuple[str, ...], objects: tuple[str, ...]) -> list[tuple[str, ...]]:
        """The actions of ``kind`` that the state allows."""
        if kind == "move":
            return [(p, place) for p in people for place in PLACES if self.location.get(p) != place]
        if kind == "grab":
            # An object nobody has seen yet can be found anywhere; a dropped one only where it lies.
            return [
                (p, obj)
                for p in people
                if p in self.location
                for obj in objects
                if obj not in self.holder and self.floor.get(obj, self.location[p]) == self.location[p]
            ]
        if kind == "drop":
            return [(p, obj) for obj, p in self.holder.items()]
        if kind == "give":
            # Handing something over needs both people in the same place.
            return [
                (p, obj, other)
                for obj, p in self.holder.items()
                for other in people
                if other != p and self.location.get(other) == self.location[p]
            ]
        raise ValueError(f"unknown action {kind}")

    def do(self, kind: str, args: tuple[str, ...]) -> None:
        if kind == "move":
            person, place = args
            self.location[person] = place
            for obj, carrier in self.holder.items():
                if carrier == person:
                    self._arrive(obj, place)
        elif kind == "grab":
            person, obj = args
            self.floor.pop(obj, None)
            self.holder[obj] = person
            self._arrive(obj, self.location[person])
        elif kind == "drop":
            person, obj = args
            del self.holder[obj]
            self.floor[obj] = self.location[person]
        elif kind == "give":
            giver, obj, receiver = args
            self.holder[obj] = receiver  # both stand in one place: the object stays where it is
            self.gives.append((giver, obj, receiver))

    def _arrive(self, obj: str, place: str) -> None:
        trail = self.trail.setdefault(obj, [])
        if not trail or trail[-1] != place:
            trail.append(place)


def simulate(task: str, rng: random.Random, n_facts: int) -> tuple[World, list[str]]:
    """n_facts random legal actions of the task's kinds (first a kind that is possible, then one of its
    actions) and their facts."""
    people, objects = CAST[task]
    world, facts = World(), []
    for _ in range(n_facts):
        legal = {kind: world.legal(kind, people, objects) for kind in KINDS[task]}
        kind = rng.choice([k for k, actions in legal.items() if actions])
        action = rng.choice(legal[kind])
        facts.append(sentence(kind, rng.choice(VERBS[kind]), action))
        world.do(kind, action)
    return world, facts


def ask(facts: list[str], questions: dict[str, str], rng: random.Random) -> Story | None:
    """A story asking one of ``questions`` (question -> its unique answer); None if there is none."""
    if not questions:
        return None
    question = rng.choice(list(questions))
    return Story(facts, question, questions[question])


def draw_qa1(rng: random.Random, n_facts: int) -> Story | None:
    """Single supporting fact: where a person is now (their latest move)."""
    world, facts = simulate("qa1", rng, n_facts)
    template = QUESTIONS["qa1"][0]
    return ask(facts, {template.format(person=p): place for p, place in world.location.items()}, rng)


def draw_qa2(rng: random.Random, n_facts: int) -> Story | None:
    """Two supporting facts: where an object is, i.e. where its carrier went, or where it was dropped."""
    world, facts = simulate("qa2", rng, n_facts)
    template = QUESTIONS["qa2"][0]
    return ask(facts, {template.format(obj=obj): world.where(obj) for obj in world.trail}, rng)


def draw_qa3(rng: random.Random, n_facts: int) -> Story | None:
    """Three supporting facts: the place an object was in before it reached a given place. A place the
    object has been in twice is not asked about: "before" it would be ambiguous."""
    world, facts = simulate("qa3", rng, n_facts)
    template = QUESTIONS["qa3"][0]
    questions = {
        template.format(obj=obj, place=trail[i]): trail[i - 1]
        for obj, trail in world.trail.items()
        for i in range(1, len(trail))
        if trail.count(trail[i]) == 1
    }
    return ask(facts, questions, rng)


def draw_qa4(rng: random.Random, n_facts: int) -> Story | None:
    """Two-argument relations: two facts put three places on a grid (the second next to the first, the
    third next to either on a free cell); the question asks for a place's neighbour in a direction, as
    bAbI does (a stated neighbour, not one reached through the other fact)."""
    first, second, third = rng.sample(PLACES, 3)
    direction = rng.choice(list(STEP))
    cells = {first: (0, 0), second: neighbour((0, 0), direction)}
    free = [
        (anchor, way)
        for anchor in (first, second)
        for way in STEP
        if neighbour(cells[anchor], way) not in cells.values()
    ]
    anchor, way = rng.choice(free)
    facts = [(second, direction, first), (third, way, anchor)]
    rng.shuffle(facts)
    place, direction, other = rng.choice(facts)
    if rng.random() < 0.5:  # the same fact, seen from the other place
        place, direction, other = other, OPPOSITE[direction], place
    by_place, by_other = QUESTIONS["qa4"]
    if rng.random() < 0.5:
        question, answer = by_place.format(direction=direction, place=other), place
    else:
        question, answer = by_other.format(place=place, direction=direction), other
    return Story([relation(*fact) for fact in facts], question, answer)


def neighbour(cell: tuple[int, int], direction: str) -> tuple[int, int]:
    return cell[0] + STEP[direction][0], cell[1] + STEP[direction][1]


def draw_qa5(rng: random.Random, n_facts: int) -> Story | None:
    """Three-argument relations: who gave what to whom, asked about one of the three roles of a give;
    a question is asked only when the story's gives leave it one answer."""
    world, facts = simulate("qa5", rng, n_facts)
    who_gave, to_whom, what = QUESTIONS["qa5"]
    questions: dict[str, str] = {}
    for giver, obj, receiver in world.gives:
        givers = {g for g, o, r in world.gives if (o, r) == (obj, receiver)}
        receivers = {r for g, o, r in world.gives if (g, o) == (giver, obj)}
        gifts = {o for g, o, r in world.gives if (g, r) == (giver, receiver)}
        if len(givers) == 1:
            questions[who_gave.format(obj=obj, receiver=receiver)] = giver
        if len(receivers) == 1:
            questions[to_whom.format(giver=giver, obj=obj)] = receiver
        if len(gifts) == 1:
            questions[what.format(giver=giver, receiver=receiver)] = obj
    return ask(facts, questions, rng)


DRAW = {"qa1": draw_qa1, "qa2": draw_qa2, "qa3": draw_qa3, "qa4": draw_qa4, "qa5": draw_qa5}


def make_story(task: str, rng: random.Random, held_out: bool) -> Story:
    """A story of ``task`` whose question has one answer, from the evaluation side if ``held_out``.
    The number of facts is drawn once, so rejected draws do not skew it towards easy lengths."""
    n_facts = rng.randint(*FACT_COUNTS[task])
    for _ in range(MAX_DRAWS):
        story = DRAW[task](rng, n_facts)
        if story is not None and story.held_out() == held_out:
            return story
    raise RuntimeError(f"no {task} story of {n_facts} facts in {MAX_DRAWS} draws")  # a generator bug


def fact_texts(task: str) -> Iterable[str]:
    """Every fact a story of ``task`` can hold."""
    if task == "qa4":
        return [relation(a, direction, b) for a, direction, b in product(PLACES, STEP, PLACES) if a != b]
    people, objects = CAST[task]
    args = {
        "move": list(product(people, PLACES)),
        "grab": list(product(people, objects)),
        "drop": list(product(people, objects)),
        "give": list(product(people, objects, people)),
    }
    return [sentence(kind, verb, a) for kind in KINDS[task] for verb in VERBS[kind] for a in args[kind]]


def question_texts(task: str) -> Iterable[str]:
    """Every question a story of ``task`` can ask (some never asked, e.g. who gave to oneself)."""
    people, objects = CAST.get(task, ((), ()))
    vocabulary = {
        "person": people,
        "giver": people,
        "receiver": people,
        "obj": objects,
        "place": PLACES,
        "direction": STEP,
    }
    texts = []
    for template in QUESTIONS[task]:
        fields = [name for name in vocabulary if "{" + name + "}" in template]
        for values in product(*(vocabulary[name] for name in fields)):
            texts.append(template.format(**dict(zip(fields, values, strict=True))))
    return texts


def answer_texts(task: str) -> Iterable[str]:
    return GIVERS + GIFTS if task == "qa5" else PLACES


class BabiLong(Task):
    name = "babilong"

    def __init__(
        self, config: BabiLongConfig, tokenizer: Tokenizer, seq_len: int, haystacks: dict[str, Haystack]
    ):
        super().__init__(tokenizer, seq_len)
        self.config = config
        self.haystacks = haystacks
        """Distractor text by split: "train" for training examples, "val" for evaluation."""
        if config.weight > 0:
            # Fail before training starts, not at the first long story thousands of steps in.
            for task in config.tasks:
                longest = self.longest_story(task)
                if longest > seq_len + 1:
                    raise DataError(
                        f"tasks.babilong: {task} stories with their question and answer reach {longest} tokens, "
                        f"more than a training row of data.seq_len + 1 = {seq_len + 1}; raise data.seq_len to "
                        f"at least {longest - 1}, or remove {task} from tasks.babilong.tasks"
                    )

    def story(self, split: str, task: str, index: int) -> Story:
        """The index-th story of a split; the same for every amount of distractor text."""
        rng = seeded(self.name, self.config.seed, split, task, index, "story")
        return make_story(task, rng, held_out=split != "train")

    def example(self, split: str, task: str, distractors: int, index: int) -> Example:
        """The index-th story of ``task`` with its facts at random depths, in order, in exactly
        ``distractors`` tokens of text from the split's haystack (0: the story alone)."""
        story = self.story(split, task, index)
        rng = seeded(self.name, self.config.seed, split, task, distractors, index, "haystack")
        facts = [self.tokenizer.encode(f" {fact}\n") for fact in story.facts]
        haystack = self.haystacks[split]
        filler = haystack.take(distractors, rng)
        depths = sorted(rng.random() for _ in facts)  # sorted: facts keep their story order
        text = haystack.insert(filler, facts, depths)
        question = self.tokenizer.encode(f"\nQuestion: {story.question}\nAnswer:")
        answer = self.tokenizer.encode(f" {story.answer}")
        cell = (("task", task), ("distractors", distractors))
        return Example.prompt_answer([self.tokenizer.bos, *text, *question], answer, cell)

    def train_example(self, index: int) -> Example:
        task = seeded(self.name, self.config.seed, "train-task", index).choice(self.config.tasks)
        needed = len(self.example("train", task, 0, index).tokens)
        if needed > self.seq_len + 1:
            raise DataError(
                f"tasks.babilong: training example {index} ({task}) needs {needed} tokens without distractors, "
                f"more than a training row of data.seq_len + 1 = {self.seq_len + 1}; raise data.seq_len to "
                f"at least {needed - 1}, or remove {task} from tasks.babilong.tasks"
            )
        distractors = min(self.config.train_distractors, self.seq_len + 1 - needed)
        return self.example("train", task, distractors, index)

    def eval_examples(self) -> list[Example]:
        return [
            self.example("val", task, distractors, i)
            for task in self.config.tasks
            for distractors in self.config.distractors
            for i in range(self.config.eval_samples)
        ]

    def longest_story(self, task: str) -> int:
        """An upper bound on the tokens of a ``task`` example without distractors: BOS, the most facts,
        each as long as the longest possible one, the longest question and the longest answer."""
        most = FACT_COUNTS[task][1]
        fact = max(len(self.tokenizer.encode(f" {text}\n")) for text in fact_texts(task))
        question = max(
            len(self.tokenizer.encode(f"\nQuestion: {text}\nAnswer:")) for text in question_texts(task)
        )
        answer = max(len(self.tokenizer.encode(f" {text}")) for text in answer_texts(task))
        return 1 + most * fact + question + answer
