"""The model library: torch and mta_lab.config only, no training or tracking framework."""

from mta_lab.model.attention import Attention
from mta_lab.model.plan import LayerPlan, depth_scale, plan_layers
from mta_lab.model.stats import parameter_counts
from mta_lab.model.transformer import Block, Transformer

__all__ = [
    "Attention",
    "Block",
    "LayerPlan",
    "Transformer",
    "depth_scale",
    "parameter_counts",
    "plan_layers",
]
