"""The root of a run's configuration; presets, files and ``key=value`` overrides all address it."""

from __future__ import annotations

from dataclasses import dataclass, field

from mta_lab.config.model import ModelConfig


@dataclass
class RunConfig:
    """Everything one run needs. Keys are dotted paths from here, e.g. ``model.mta.pre_qk_conv``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
