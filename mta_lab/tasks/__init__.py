"""Synthetic tasks: the paper's toy task, needle-in-a-haystack, BabiLong-style QA, and MQAR."""

from __future__ import annotations

import importlib

from mta_lab.config.data import BabiLongConfig, MQARConfig, NeedleConfig, ToyBlockConfig
from mta_lab.data.tokenizers import Tokenizer
from mta_lab.tasks.base import Cell, Example, Tally, Task
from mta_lab.tasks.haystack import Haystack

__all__ = ["TASKS", "Cell", "Example", "Haystack", "Tally", "Task", "build_task"]

TASKS: dict[str, tuple[str, str, bool]] = {
    "toy_block": ("mta_lab.tasks.toy_block", "ToyBlock", False),
    "niah": ("mta_lab.tasks.niah", "NeedleInAHaystack", True),
    "babilong": ("mta_lab.tasks.babilong", "BabiLong", True),
    "mqar": ("mta_lab.tasks.mqar", "MQAR", False),
}
"""Every task by its field name in ``TasksConfig``: (module, class, whether it reads haystack text).
Adding a task touches this table, its config in ``config/data.py`` and its module."""

HAYSTACK_TASKS = tuple(name for name, (_, _, haystack) in TASKS.items() if haystack)


def build_task(
    name: str,
    config: ToyBlockConfig | NeedleConfig | BabiLongConfig | MQARConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    haystacks: dict[str, Haystack] | None,
) -> Task:
    """The task called ``name`` (a field of TasksConfig)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name} (allowed: {', '.join(TASKS)})")
    module, cls, needs_haystack = TASKS[name]
    task = getattr(importlib.import_module(module), cls)  # imported when used: each pulls its own data
    if not needs_haystack:
        return task(config, tokenizer, seq_len)
    assert haystacks is not None, f"{name} needs haystack text"
    return task(config, tokenizer, seq_len, haystacks)
