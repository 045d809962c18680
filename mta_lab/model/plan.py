"""Placement, resolved once at build time: which mechanisms each layer runs, and its depth factors.

The official code decides this inside ``BaseTransformer.__init__`` by copying and mutating arguments
per layer (spec 1.6). Here every mechanism carries its own :class:`LayerSelection`, and this module
turns the model config into one :class:`LayerPlan` per layer; the modules never see placement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mta_lab.config import DepthScaling, ModelConfig, MTAConfig


@dataclass(frozen=True)
class LayerPlan:
    """What one layer runs."""

    layer_id: int
    """0-based index of the layer."""
    mta: MTAConfig | None
    """The MTA stages active in this layer; None when none is (plain attention)."""
    out_norm_scale: float
    """Depth factor after this layer's per-head output norm."""
    prenorm_scale: float
    """Depth factor after this block's two pre-norms."""

    @property
    def uses_score_map(self) -> bool:
        return self.mta is not None and self.mta.needs_score_map

    def describe(self) -> str:
        if self.mta is None:
            return "plain attention (sdpa)"
        stages = [f"{name} ({mechanism.describe()})" for name, mechanism in self.mta.mechanisms().items()]
        path = "explicit score map" if self.uses_score_map else "sdpa"
        return f"{path}: " + ", ".join(stages)


def depth_scale(kind: DepthScaling, layer_id: int) -> float:
    """The factor of a 0-based layer under a depth-scaling rule (spec 1.5)."""
    if kind == DepthScaling.diff:
        return 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer_id))
    if kind == DepthScaling.inverse_sqrt:
        return 1.0 / math.sqrt(layer_id + 1)
    return 1.0


def plan_layers(config: ModelConfig) -> list[LayerPlan]:
    """One plan per layer, in order."""
    return [_plan_layer(config, layer_id) for layer_id in range(config.n_layers)]


def _plan_layer(config: ModelConfig, layer_id: int) -> LayerPlan:
    mta = None
    out_norm_scale = 1.0
    if config.mta is not None:
        active = {
            name: mechanism if layer_id in mechanism.layers.layer_ids(config.n_layers) else None
            for name, mechanism in config.mta.mechanisms().items()
        }
        layer_mta = dataclasses.replace(MTAConfig(), **active)
        mta = layer_mta if layer_mta.mechanisms() else None
        if mta is not None and mta.out_norm is not None:
            out_norm_scale = depth_scale(mta.out_norm.depth_scaling, layer_id)
    return LayerPlan(
        layer_id=layer_id,
        mta=mta,
        out_norm_scale=out_norm_scale,
        prenorm_scale=depth_scale(config.prenorm_scaling, layer_id),
    )
