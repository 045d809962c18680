"""Weight initialisation, in one place (spec 1.7; Lingua's scheme for the base weights).

Base weights: truncated normals (+-3 std) with std = init_std (default dim ** -0.5); output
projections divide it by the depth factor; the FFN's w2 uses hidden ** -0.5. Norms start at 1.
MTA: key-query kernels follow their config's ``init``; head mixing starts as the identity; the gate
weight is a truncated normal like the projections and its bias is 0 (the official code leaves the
bias uninitialised).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from mta_lab.config import InitStdFactor, KernelInit, QKConvConfig

if TYPE_CHECKING:
    from mta_lab.model.transformer import Transformer

DEFAULT_SCALE = {KernelInit.const: 0.3, KernelInit.uniform: 1.0, KernelInit.normal: 0.3}


@torch.no_grad()
def qk_kernel_(weight_hqk: torch.Tensor, config: QKConvConfig) -> None:
    """Initialise a (heads, c_q, c_k) key-query kernel in place."""
    c_q, c_k = config.query_kernel, config.key_kernel
    scale = config.init_scale if config.init_scale is not None else DEFAULT_SCALE.get(config.init)
    weight_hqk.zero_()
    if config.init == KernelInit.identity:
        weight_hqk[:, c_q - 1, config.left_pad] = 1.0
    elif config.init == KernelInit.const:
        weight_hqk.fill_(scale)
    elif config.init == KernelInit.uniform:
        weight_hqk.uniform_(-scale, scale)
    elif config.init == KernelInit.normal:
        truncated_normal_(weight_hqk, std=scale)
    elif config.init == KernelInit.diagonal:
        # Tap (a, b) reads A[i + a - (c_q-1), j + b - l]: equal query and key offsets on
        # b = a + l - (c_q-1). For 'both' padding this is the official b - a = (c_k+1)//2 - c_q.
        for a in range(c_q):
            b = a + config.left_pad - (c_q - 1)
            if 0 <= b < c_k:
                weight_hqk[:, a, b] = 1.0


@torch.no_grad()
def eye_(weight_gcc: torch.Tensor) -> None:
    """Identity mixing in every group of a (groups, c, c) weight."""
    weight_gcc.copy_(torch.eye(weight_gcc.shape[-1]).expand_as(weight_gcc))


def truncated_normal_(weight: torch.Tensor, std: float, bound: float | None = None) -> None:
    bound = 3 * std if bound is None else bound
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-bound, b=bound)


def depth_factor(kind: InitStdFactor, layer_id: int, n_layers: int, dim: int) -> float:
    return {
        InitStdFactor.disabled: 1.0,
        InitStdFactor.global_depth: math.sqrt(2 * (n_layers + 1)),
        InitStdFactor.current_depth: math.sqrt(2 * (layer_id + 1)),
        InitStdFactor.dim_ratio: dim / 4096,
    }[kind]


def init_weights_(model: Transformer) -> None:
    """(Re)initialise every parameter of a model in place."""
    config = model.config
    std = config.init_std or config.dim**-0.5
    truncated_normal_(model.tok_embeddings.weight, std)
    if model.output is not None:
        truncated_normal_(model.output.weight, std)
    nn.init.ones_(model.norm.weight)
    for block in model.layers:
        factor = depth_factor(config.init_std_factor, block.layer_id, config.n_layers, config.dim)
        attention = block.attention
        for projection in (attention.wq, attention.wk, attention.wv):
            truncated_normal_(projection.weight, std)
        truncated_normal_(attention.wo.weight, std / factor, bound=3 * std)
        for stage in (
            attention.pre_qk_conv,
            attention.pre_head_mix,
            attention.post_qk_conv,
            attention.post_head_mix,
        ):
            if stage is not None:
                stage.reset_parameters()
        if attention.out_norm is not None:
            if attention.out_norm.rms is not None:
                nn.init.ones_(attention.out_norm.rms.weight)
            if attention.out_norm.gate is not None:
                truncated_normal_(attention.out_norm.gate.weight, std / factor, bound=3 * std)
                nn.init.zeros_(attention.out_norm.gate.bias)
        ffn_in_std = config.init_std or config.dim**-0.5
        ffn_out_std = (config.init_std or config.ffn_hidden**-0.5) / factor
        truncated_normal_(block.ffn.w1.weight, ffn_in_std)
        truncated_normal_(block.ffn.w3.weight, ffn_in_std)
        truncated_normal_(block.ffn.w2.weight, ffn_out_std)
        nn.init.ones_(block.attention_norm.weight)
        nn.init.ones_(block.ffn_norm.weight)
