"""The MTA attention layer against the independent float64 re-derivation in mta_reference.py."""

from __future__ import annotations

import math

import mta_reference as reference
import pytest
import torch
from conftest import build_attention, randomize_, run_attention

from mta_lab.config import (
    AttentionKernel,
    DepthScaling,
    GateKind,
    HeadMixConfig,
    KernelInit,
    KeyPadding,
    ModelConfig,
    MTAConfig,
    OutNormConfig,
    QKConvConfig,
    RuntimeConfig,
)

RANDOM = KernelInit.normal  # the kernels are overwritten with random values anyway


def conv(c_q: int, c_k: int, padding: str = "both") -> QKConvConfig:
    init = KernelInit.identity if padding == "both" else RANDOM
    return QKConvConfig(query_kernel=c_q, key_kernel=c_k, key_padding=KeyPadding(padding), init=init)


# (n_heads, n_kv_heads, head_dim, seq_len, mta)
CASES = {
    "pre-conv-both": (2, 2, 4, 7, MTAConfig(pre_qk_conv=conv(3, 5))),
    "pre-conv-left-gqa": (4, 2, 4, 6, MTAConfig(pre_qk_conv=conv(2, 4, "left"))),
    "pre-conv-right-mqa": (4, 1, 4, 6, MTAConfig(pre_qk_conv=conv(2, 3, "right"))),
    "post-conv-both": (2, 1, 4, 7, MTAConfig(post_qk_conv=conv(2, 3))),
    "post-conv-left": (2, 2, 6, 5, MTAConfig(post_qk_conv=conv(3, 2, "left"))),
    "pre-mix-grouped": (4, 2, 4, 5, MTAConfig(pre_head_mix=HeadMixConfig(group_size=2))),
    "post-mix-grouped-c1": (4, 4, 4, 5, MTAConfig(post_head_mix=HeadMixConfig(group_size=1))),
    "talking-heads": (4, 2, 4, 5, MTAConfig(pre_head_mix=HeadMixConfig(), post_head_mix=HeadMixConfig())),
    "kernel-wider-than-sequence": (2, 2, 4, 4, MTAConfig(pre_qk_conv=conv(6, 11), post_qk_conv=conv(6, 11))),
    "paper-layer": (
        4,
        4,
        4,
        8,
        MTAConfig(
            pre_qk_conv=conv(3, 5),
            pre_head_mix=HeadMixConfig(),
            post_qk_conv=conv(2, 3),
            post_head_mix=HeadMixConfig(),
            out_norm=OutNormConfig(gate=GateKind.scalar),
        ),
    ),
    "everything-grouped-gqa": (
        4,
        2,
        6,
        7,
        MTAConfig(
            pre_qk_conv=conv(2, 3, "right"),
            pre_head_mix=HeadMixConfig(group_size=2),
            post_qk_conv=conv(3, 3, "left"),
            post_head_mix=HeadMixConfig(group_size=2),
            out_norm=OutNormConfig(depth_scaling=DepthScaling.diff, gate=GateKind.elementwise),
        ),
    ),
    "gate-without-norm": (2, 2, 4, 5, MTAConfig(out_norm=OutNormConfig(norm=False, gate=GateKind.scalar))),
    "norm-inverse-sqrt": (
        2,
        2,
        4,
        5,
        MTAConfig(out_norm=OutNormConfig(depth_scaling=DepthScaling.inverse_sqrt)),
    ),
}


LEFT_PAD = {"both": lambda c_k: (c_k - 1) // 2, "left": lambda c_k: c_k - 1, "right": lambda c_k: 0}


def reference_spec(config: ModelConfig, layer_id: int) -> dict:
    """What the reference needs to know, derived from the spec's formulas (not from mta_lab)."""
    mta = config.mta
    spec = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads or config.n_heads}
    spec["rope_theta"] = config.rope_theta
    for stage in ("pre", "post"):
        qk = getattr(mta, f"{stage}_qk_conv")
        if qk:
            spec[f"{stage}_left_pad"] = LEFT_PAD[qk.key_padding.value](qk.key_kernel)
    if mta.out_norm:
        spec["out_norm_eps"] = mta.out_norm.eps
        spec["out_norm_scale"] = {
            "none": 1.0,
            "diff": 1 - (0.8 - 0.6 * math.exp(-0.3 * layer_id)),  # spec 1.5, 0-based layer_id
            "inverse_sqrt": 1 / math.sqrt(layer_id + 1),
        }[mta.out_norm.depth_scaling.value]
    return spec


PATHS = {
    "reference": RuntimeConfig(attention_kernel=AttentionKernel.reference),
    # Blocks of 1 and 3 query rows: several blocks per sequence, and fewer rows than a block's halo.
    "tiled-1": RuntimeConfig(attention_kernel=AttentionKernel.tiled, attention_tile_rows=1),
    "tiled-3": RuntimeConfig(attention_kernel=AttentionKernel.tiled, attention_tile_rows=3),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", CASES)
def test_layer_matches_float64_reference(name, path):
    """Outputs, and gradients of the input and of every parameter, on the full score map and on the
    tiled path (blocks of query rows against their causal keys, recomputed in backward)."""
    n_heads, n_kv_heads, head_dim, seq_len, mta = CASES[name]
    config = ModelConfig(
        dim=n_heads * head_dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_layers=4,
        rope_theta=500.0,
        mta=mta,
    )
    layer_id = 3  # not 0: depth scaling must use this layer's factor
    layer = build_attention(config, layer_id=layer_id, runtime=PATHS[path])
    assert layer.execution.path == (path.split("-")[0] if mta.needs_score_map else "sdpa")
    randomize_(layer, seed=sum(map(ord, name)))
    x = torch.randn(2, seq_len, config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    params = {key: value.detach().clone().requires_grad_() for key, value in layer.named_parameters()}
    x_expected, x_actual = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = reference.attention_layer(x_expected, params, reference_spec(config, layer_id))
    actual = run_attention(layer, x_actual, config.rope_theta)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)

    (expected * d_out).sum().backward()
    (actual * d_out).sum().backward()
    torch.testing.assert_close(x_actual.grad, x_expected.grad, rtol=1e-9, atol=1e-12)
    for key, parameter in layer.named_parameters():
        torch.testing.assert_close(parameter.grad, params[key].grad, rtol=1e-9, atol=1e-12, msg=key)


IDENTITY_STAGES = {
    "pre_qk_conv": QKConvConfig(query_kernel=4, key_kernel=7),
    "pre_head_mix": HeadMixConfig(group_size=2),
    "post_qk_conv": QKConvConfig(query_kernel=3, key_kernel=5),
    "post_head_mix": HeadMixConfig(),
}


@pytest.mark.parametrize(
    "stages", [[s] for s in IDENTITY_STAGES] + [list(IDENTITY_STAGES)], ids=lambda s: "+".join(s)
)
@pytest.mark.parametrize("shape", [(4, 4, 4, 9), (4, 2, 8, 6), (4, 1, 4, 13)], ids=["mha", "gqa", "mqa"])
def test_identity_init_reproduces_sdpa(stages, shape):
    """Spec checklist 1: at identity init every stage, alone or all together, is plain attention."""
    n_heads, n_kv_heads, head_dim, seq_len = shape
    base = dict(dim=n_heads * head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    sdpa = build_attention(ModelConfig(**base))
    mta = build_attention(ModelConfig(**base, mta=MTAConfig(**{s: IDENTITY_STAGES[s] for s in stages})))
    assert sdpa.execution.path == "sdpa" and mta.execution.path != "sdpa"
    missing, unexpected = mta.load_state_dict(sdpa.state_dict(), strict=False)
    assert not unexpected and all(key.split(".")[0] in stages for key in missing)

    x = torch.randn(3, seq_len, base["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run_attention(mta, x, 1e4), run_attention(sdpa, x, 1e4), rtol=0, atol=1e-12)


def test_reference_detects_a_flipped_kernel():
    """The reference comparison must fail for the other kernel orientation (a test that can fail)."""
    config = ModelConfig(
        dim=8, n_heads=2, mta=MTAConfig(pre_qk_conv=QKConvConfig(query_kernel=2, key_kernel=3))
    )
    layer = build_attention(config)
    randomize_(layer, seed=3)
    x = torch.randn(1, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    params = {key: value.detach().clone() for key, value in layer.named_parameters()}
    params["pre_qk_conv.weight"] = params["pre_qk_conv.weight"].flip(1, 2)
    flipped = reference.attention_layer(x, params, reference_spec(config, 0))
    assert not torch.allclose(run_attention(layer, x, config.rope_theta), flipped, atol=1e-6)
