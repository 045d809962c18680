"""Parameter counts by component; works on meta-device models (nothing allocated)."""

from __future__ import annotations

from collections import Counter

from torch import nn

from mta_lab.config import SCORE_MAP_STAGES

# Module attribute name -> component, matched from the innermost module outwards.
COMPONENTS = {
    "tok_embeddings": "embedding",
    "output": "output projection",
    "wq": "attention projections",
    "wk": "attention projections",
    "wv": "attention projections",
    "wo": "attention projections",
    "w1": "feed-forward",
    "w2": "feed-forward",
    "w3": "feed-forward",
    "attention_norm": "block norms",
    "ffn_norm": "block norms",
    "norm": "block norms",
    **{stage: stage for stage in SCORE_MAP_STAGES},
    "rms": "out_norm",
    "gate": "out_norm gate",
}


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per component (shared tensors counted once), in a fixed display order."""
    counts: Counter[str] = Counter()
    for name, parameter in model.named_parameters():
        modules = name.split(".")[:-1]
        component = next((COMPONENTS[m] for m in reversed(modules) if m in COMPONENTS), "other")
        counts[component] += parameter.numel()
    order = list(dict.fromkeys(COMPONENTS.values())) + ["other"]
    return {component: counts[component] for component in order if counts[component]}
