"""How long a run trains, resolved from its config: optimizer steps, or seconds of training.

A budget in steps is used as given; one in tokens becomes the whole optimizer steps that cover it,
one in FLOPs the nearest whole steps (a costlier model reaches a FLOP budget in fewer); one in seconds has no step count:
the run stops when its training clock reaches it. The learning-rate schedule spans the budget either
way (steps, or the fraction of the time spent).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from mta_lab.config import RunConfig
from mta_lab.model.flops import training_flops_per_token


@dataclass(frozen=True)
class Budget:
    kind: str
    """What the config gives: steps, tokens, flops or seconds."""
    steps: int | None
    """Optimizer steps; None for a time budget."""
    seconds: float | None
    """Seconds of training; None unless the budget is time."""
    tokens_per_step: int
    flops_per_token: float
    """Forward + backward, analytic (mta_lab.model.flops)."""

    @property
    def tokens(self) -> int | None:
        return None if self.steps is None else self.steps * self.tokens_per_step

    @property
    def flops(self) -> float | None:
        return None if self.tokens is None else self.tokens * self.flops_per_token

    def describe(self) -> str:
        if self.steps is None:
            return f"{self.seconds:,g} s of training"
        return f"{self.steps:,} steps = {self.tokens:,} tokens = {self.flops:.3g} FLOPs"


def resolve_budget(config: RunConfig) -> Budget:
    train, seq_len = config.train, config.data.seq_len
    tokens_per_step = train.tokens_per_step(seq_len)
    flops_per_token = sum(training_flops_per_token(config.model, seq_len).values())
    kind = train.budget_kind
    steps = {
        "steps": train.steps,
        "tokens": None if train.tokens is None else -(-train.tokens // tokens_per_step),
        # The nearest whole steps (a FLOP-matched cell is off by at most half a step, either way).
        "flops": None
        if train.flops is None
        else max(1, math.floor(train.flops / (tokens_per_step * flops_per_token) + 0.5)),
        "seconds": None,
    }[kind]
    return Budget(kind, steps, train.seconds, tokens_per_step, flops_per_token)


TIMER = time.perf_counter
"""What the training clock reads (a test gives it a fake that advances by the training step)."""


class TrainingClock:
    """Seconds of training, continued across resumes: wall time from one optimizer step's end to the
    next (forward, backward, the optimizer, fetching the batch), less what runs paused in between
    (evaluation, checkpoints, logging)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self._since = seconds, None

    def resume(self) -> None:
        self._since = TIMER()

    def pause(self) -> None:
        if self._since is not None:
            self.seconds += TIMER() - self._since
            self._since = None

    @property
    def running(self) -> bool:
        return self._since is not None

    def now(self) -> float:
        running = 0.0 if self._since is None else TIMER() - self._since
        return self.seconds + running
