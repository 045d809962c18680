"""Analytic FLOP counts of a model config, per component: what a run costs, whichever path computes it.

Counted are the multiply-adds (2 FLOPs each) of every matmul-like operation: the q, k, v and output
projections, the feed-forward network, the output projection, the score map and the
attention-times-values product, and each MTA stage (a key-query convolution: c_q * c_k multiply-adds per
kept score; head mixing: c_h per score; the gate's linear map per head). Elementwise work (norms,
softmax, RoPE, masks, the SwiGLU product) is left out, as ``torch.utils.flop_counter`` and the usual
6N-per-token convention leave it out. The embedding is a lookup: 0.

``causal=True`` (the default) counts the scores a causal model keeps: query i attends to i + 1 keys, so
T (T + 1) / 2 per head, not T^2; an implementation that computes the full map (the reference path)
executes the dense count, ``causal=False``. Training is forward plus backward, and the backward of each
of these operations is two forward's worth (the gradients of both operands): 3x the forward.
"""

from __future__ import annotations

from mta_lab.config import GateKind, ModelConfig
from mta_lab.model.plan import plan_layers

BACKWARD_FACTOR = 2
"""The backward pass of a product costs two forward passes: the gradient of each operand."""


def forward_flops(config: ModelConfig, seq_len: int, causal: bool = True) -> dict[str, int]:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, by component, in a fixed order."""
    t, dim, heads, head_dim = seq_len, config.dim, config.n_heads, config.head_dim
    scores = t * (t + 1) // 2 if causal else t * t  # kept (query, key) pairs per head
    counts = dict.fromkeys(
        (
            "attention projections",
            "attention scores and values",
            "pre_qk_conv",
            "pre_head_mix",
            "post_qk_conv",
            "post_head_mix",
            "out_norm gate",
            "feed-forward",
            "output projection",
        ),
        0,
    )
    projected = 2 * heads * head_dim + 2 * config.kv_heads * head_dim  # q and output; k and v
    for plan in plan_layers(config):
        counts["attention projections"] += 2 * t * dim * projected
        counts["attention scores and values"] += 2 * 2 * heads * head_dim * scores  # q.k, then probs.v
        counts["feed-forward"] += 2 * t * 3 * dim * config.ffn_hidden
        mta = plan.mta
        if mta is None:
            continue
        for name in ("pre_qk_conv", "post_qk_conv"):
            conv = getattr(mta, name)
            if conv is not None:
                counts[name] += 2 * conv.query_kernel * conv.key_kernel * heads * scores
        for name in ("pre_head_mix", "post_head_mix"):
            mix = getattr(mta, name)
            if mix is not None:
                counts[name] += 2 * mix.size(heads) * heads * scores
        if mta.out_norm is not None:
            gate = {GateKind.none: 0, GateKind.scalar: 1, GateKind.elementwise: head_dim}[mta.out_norm.gate]
            counts["out_norm gate"] += 2 * t * heads * head_dim * gate
    counts["output projection"] = 2 * t * dim * config.vocab_size
    return {name: count for name, count in counts.items() if count}


def training_flops_per_token(config: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward plus backward FLOPs per token at ``seq_len``, by component (causal counts)."""
    return {
        name: count * (1 + BACKWARD_FACTOR) / seq_len
        for name, count in forward_flops(config, seq_len, causal=True).items()
    }
