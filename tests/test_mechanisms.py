"""Hand-computed cases for each mechanism: kernel orientation, padding, head mixing, inits, depth."""

from __future__ import annotations

import math

import pytest
import torch

from mta_lab.config import DepthScaling, HeadMixConfig, KernelInit, KeyPadding, QKConvConfig
from mta_lab.model import depth_scale
from mta_lab.model.mechanisms import HeadMix, QKConv

# One head, 3x3 causal map: future entries are 0 (Mask_0 has been applied).
A = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0], [4.0, 5.0, 6.0]])[None, None]


def conv_with_single_tap(c_q: int, c_k: int, padding: str, tap: tuple[int, int]) -> QKConv:
    init = KernelInit.zero
    conv = QKConv(
        QKConvConfig(query_kernel=c_q, key_kernel=c_k, key_padding=KeyPadding(padding), init=init), 1
    )
    with torch.no_grad():
        conv.weight[0, tap[0], tap[1]] = 1.0
    return conv


@pytest.mark.parametrize(
    ("c_q", "c_k", "padding", "tap", "expected"),
    [
        # Last row, centre column: the current query and the same key -> identity.
        (2, 3, "both", (1, 1), [[1, 0, 0], [2, 3, 0], [4, 5, 6]]),
        # Row above the last: the previous query -> out[i, j] = A[i-1, j].
        (2, 3, "both", (0, 1), [[0, 0, 0], [1, 0, 0], [2, 3, 0]]),
        # Column right of centre: the next key -> out[i, j] = A[i, j+1].
        (2, 3, "both", (1, 2), [[0, 0, 0], [3, 0, 0], [5, 6, 0]]),
        # Left padding, first column: key j-2 -> out[i, j] = A[i, j-2].
        (1, 3, "left", (0, 0), [[0, 0, 1], [0, 0, 2], [0, 0, 4]]),  # future entries are masked later
        # Right padding, last column: key j+2 -> out[i, j] = A[i, j+2].
        (1, 3, "right", (0, 2), [[0, 0, 0], [0, 0, 0], [6, 0, 0]]),
        # Two queries back and one key back.
        (3, 3, "both", (0, 0), [[0, 0, 0], [0, 0, 0], [0, 1, 0]]),
    ],
)
def test_kernel_orientation(c_q, c_k, padding, tap, expected):
    conv = conv_with_single_tap(c_q, c_k, padding, tap)
    assert conv(A)[0, 0].tolist() == expected


def test_identity_kernel_position():
    for c_q, c_k, centre in [(1, 1, 0), (6, 11, 5), (2, 9, 4)]:
        weight = QKConv(QKConvConfig(query_kernel=c_q, key_kernel=c_k), n_heads=3).weight
        expected = torch.zeros(3, c_q, c_k)
        expected[:, c_q - 1, centre] = 1.0
        assert torch.equal(weight, expected)


def test_const_zero_uniform_normal_inits():
    def weight(init: str, scale=None):
        torch.manual_seed(0)
        config = QKConvConfig(
            query_kernel=6,
            key_kernel=11,
            key_padding=KeyPadding.left,
            init=KernelInit(init),
            init_scale=scale,
        )
        return QKConv(config, n_heads=16).weight.detach()

    assert torch.equal(weight("zero"), torch.zeros(16, 6, 11))
    assert torch.equal(weight("const"), torch.full((16, 6, 11), 0.3))  # the official constant
    assert torch.equal(weight("const", 0.05), torch.full((16, 6, 11), 0.05))
    uniform = weight("uniform")
    assert -1 <= uniform.min() < -0.9 and 0.9 < uniform.max() <= 1  # U(-1, 1)
    normal = weight("normal")
    assert normal.abs().max() <= 0.9 and 0.25 < normal.std() < 0.32  # N(0, 0.3) truncated at 3 std


@pytest.mark.parametrize(("padding", "c_k"), [("both", 11), ("left", 11), ("left", 4)])
def test_diagonal_init_sums_along_the_diagonal(padding, c_k):
    """Spec 1.7: for 6x11 'both' the taps are W[a, a]; in general out[i, j] = sum_k A[i-k, j-k]."""
    config = QKConvConfig(
        query_kernel=6, key_kernel=c_k, key_padding=KeyPadding(padding), init=KernelInit.diagonal
    )
    conv = QKConv(config, n_heads=1)
    if (padding, c_k) == ("both", 11):
        assert torch.equal(conv.weight[0], torch.eye(6, 11))
    maps = torch.randn(1, 1, 9, 9).tril()
    reach = min(6, c_k)  # the diagonal has one tap per query row that fits in the kernel
    expected = torch.zeros(9, 9)
    for i in range(9):
        for j in range(9):
            expected[i, j] = sum(maps[0, 0, i - k, j - k] for k in range(reach) if i - k >= 0 and j - k >= 0)
    torch.testing.assert_close(conv(maps)[0, 0], expected)


def test_head_mixing_follows_equation_7():
    """Eq. 7 with c_h = 2: A1' = w11 A1 + w12 A2, A2' = w21 A1 + w22 A2, per group of 2 heads."""
    mix = HeadMix(HeadMixConfig(group_size=2), n_heads=4)
    w = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [-1.0, 2.0]]])
    with torch.no_grad():
        mix.weight.copy_(w)
    maps = torch.arange(4.0).reshape(1, 4, 1, 1) + 1  # heads hold 1, 2, 3, 4
    assert mix(maps).flatten().tolist() == [1 * 1 + 2 * 2, 3 * 1 + 4 * 2, 0.5 * 3, -1 * 3 + 2 * 4]


def test_head_mixing_starts_as_identity():
    mix = HeadMix(HeadMixConfig(group_size=2), n_heads=6)
    maps = torch.randn(2, 6, 5, 5)
    assert torch.equal(mix(maps), maps)


def test_depth_scaling_values():
    # Spec 1.5: layer 0 -> 0.80, 1 -> 0.644, 5 -> 0.334, 23 -> 0.201 (0-based layer ids).
    for layer_id, factor in [(0, 0.80), (1, 0.644), (5, 0.334), (23, 0.201)]:
        assert depth_scale(DepthScaling.diff, layer_id) == pytest.approx(factor, abs=5e-4)
    assert depth_scale(DepthScaling.inverse_sqrt, 3) == pytest.approx(0.5)
    assert depth_scale(DepthScaling.none, 7) == 1.0
    assert depth_scale(DepthScaling.diff, 4) == pytest.approx(0.2 + 0.6 * math.exp(-1.2))


@pytest.mark.parametrize(
    ("padding", "ones"),
    [
        # 3x5 kernel. "both": the official diagonal b - a = (5+1)//2 - 3 = 0. One-sided padding: the diagonal
        # moves with the padding so that it still ends at the (current query, same key) tap, (2, left pad).
        (KeyPadding.both, [(0, 0), (1, 1), (2, 2)]),
        (KeyPadding.left, [(0, 2), (1, 3), (2, 4)]),
        (KeyPadding.right, [(2, 0)]),
    ],
)
def test_diagonal_init_passes_through_the_identity_tap(padding, ones):
    from mta_lab.model.init import qk_kernel_

    config = QKConvConfig(query_kernel=3, key_kernel=5, key_padding=padding, init=KernelInit.diagonal)
    weight = torch.full((2, 3, 5), 7.0)
    qk_kernel_(weight, config)
    expected = torch.zeros(2, 3, 5)
    for a, b in ones:
        expected[:, a, b] = 1.0
    torch.testing.assert_close(weight, expected)
