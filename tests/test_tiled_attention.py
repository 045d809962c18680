"""The tiled score-map path: the reference stages on blocks of query rows. Its numbers are checked
against the float64 re-derivation in test_attention_reference.py; here, what tiling is for."""

from __future__ import annotations

import torch
from conftest import MadeTensors, build_attention, randomize_, run_attention

from mta_lab.config import AttentionKernel, HeadMixConfig, ModelConfig, MTAConfig, QKConvConfig, RuntimeConfig

PAPER_LIKE = MTAConfig(
    pre_qk_conv=QKConvConfig(query_kernel=3, key_kernel=5),
    pre_head_mix=HeadMixConfig(),
    post_qk_conv=QKConvConfig(query_kernel=4, key_kernel=3),
    post_head_mix=HeadMixConfig(),
)


def layer(kernel: AttentionKernel, dropout: float = 0.0, tile_rows: int = 8):
    config = ModelConfig(
        dim=16,
        n_heads=4,
        n_layers=1,
        mta=PAPER_LIKE,
        dropout=dropout,
    )
    module = build_attention(
        config, runtime=RuntimeConfig(attention_kernel=kernel, attention_tile_rows=tile_rows)
    )
    randomize_(module, seed=11, scale=0.3)
    return module


def test_tiled_maps_hold_a_block_of_rows_not_the_whole_sequence():
    """No tensor made in forward or backward is larger than a block's map: (tile rows + the convs'
    halo of (3-1) + (4-1) rows + a kernel's padding) x (t + a kernel's padding) per (batch, head),
    where the full map is t x t."""
    b, t, rows = 2, 64, 8
    halo, pad = (3 - 1) + (4 - 1), 4 + 5

    def largest(kernel):
        x = torch.randn(b, t, 16, dtype=torch.float64, requires_grad=True)
        with MadeTensors() as made:
            run_attention(layer(kernel, tile_rows=rows), x, 10_000.0).sum().backward()
        return max(torch.Size(shape).numel() for _, shape in made.shapes)

    assert largest(AttentionKernel.reference) >= b * 4 * t * t  # the probe sees the full maps
    assert largest(AttentionKernel.tiled) <= b * 4 * (rows + halo + pad) * (t + pad)


def test_tiled_path_replays_its_dropout_in_the_backward_pass():
    """Blocks are recomputed for the backward pass; the recomputation must drop the same weights as
    the forward did, so gradients equal those of the blocks kept whole in memory."""
    module = layer(AttentionKernel.tiled, dropout=0.5, tile_rows=4).train()
    t = 13
    q, k, v = (torch.randn(1, 4, t, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    d_out = torch.randn(1, 4, t, 4, dtype=torch.float64)

    def gradients(attention):
        torch.manual_seed(0)
        out = attention()
        grads = torch.autograd.grad((out * d_out).sum(), (q, k, v))
        return out, grads

    tiled_out, tiled = gradients(lambda: module.score_map_attention(q, k, v, tile_rows=4))
    kept_out, kept = gradients(
        lambda: torch.cat(
            [module._score_map_rows(q, k, v, first, min(first + 4, t)) for first in range(0, t, 4)], 2
        )
    )
    torch.testing.assert_close(tiled_out, kept_out, rtol=0, atol=0)
    for actual, expected in zip(tiled, kept, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    without_dropout = module.eval().score_map_attention(q, k, v, tile_rows=4)
    assert not torch.allclose(tiled_out, without_dropout)  # dropout was on
