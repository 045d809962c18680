"""Synthetic tasks: the paper's toy task, needle-in-a-haystack, BabiLong-style QA, and MQAR."""

from __future__ import annotations

from mta_lab.config.data import BabiLongConfig, MQARConfig, NeedleConfig, ToyBlockConfig
from mta_lab.data.tokenizers import Tokenizer
from mta_lab.tasks.base import Cell, Example, Tally, Task
from mta_lab.tasks.haystack import Haystack

__all__ = ["Cell", "Example", "Haystack", "Tally", "Task", "build_task"]

HAYSTACK_TASKS = ("niah", "babilong")


def build_task(
    name: str,
    config: ToyBlockConfig | NeedleConfig | BabiLongConfig | MQARConfig,
    tokenizer: Tokenizer,
    seq_len: int,
    haystacks: dict[str, Haystack] | None,
) -> Task:
    """The task called ``name`` (a field of TasksConfig)."""
    if name == "toy_block":
        from mta_lab.tasks.toy_block import ToyBlock

        return ToyBlock(config, tokenizer, seq_len)
    if name == "mqar":
        from mta_lab.tasks.mqar import MQAR

        return MQAR(config, tokenizer, seq_len)
    assert haystacks is not None, f"{name} needs haystack text"
    if name == "niah":
        from mta_lab.tasks.niah import NeedleInAHaystack

        return NeedleInAHaystack(config, tokenizer, seq_len, haystacks)
    if name == "babilong":
        from mta_lab.tasks.babilong import BabiLong

        return BabiLong(config, tokenizer, seq_len, haystacks)
    raise ValueError(f"unknown task {name}")
