"""The Multi-Token Attention stages that act on a score map or on the heads' outputs.

Shape legend: b batch, h query heads, q query positions, k key positions, g head groups,
c heads per group (c_h), d head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mta_lab.config import GateKind, HeadMixConfig, OutNormConfig, QKConvConfig
from mta_lab.model import init
from mta_lab.model.layers import RMSNorm


class QKConv(nn.Module):
    """Key-query convolution: depthwise 2-D convolution of each head's (query, key) map (spec 1.2).

    out[i, j] = sum_{a, b} W[a, b] * A[i + a - (c_q - 1), j + b - l], with l the left key padding and
    out-of-range terms 0. Row a = c_q - 1 of the kernel is the current query (query padding is
    causal: only past queries); with ``both`` padding column (c_k - 1) / 2 is the same key. This is
    the official code's orientation: the paper's theta flipped in both axes.

    The input's future entries (key > query) must already be 0 (Mask_0 of Eq. 5); the output's are
    meaningless and the caller masks them. Keys past the map's last column are taken as 0, so a map
    cut after the last query's column (every later entry is masked) convolves exactly.
    """

    def __init__(self, config: QKConvConfig, n_heads: int):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(
            torch.empty(n_heads, config.query_kernel, config.key_kernel)
        )  # h, c_q, c_k
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.qk_kernel_(self.weight, self.config)

    @property
    def halo_rows(self) -> int:
        """Query rows above an output row that it reads: c_q - 1."""
        return self.config.query_kernel - 1

    def forward(self, maps_bhqk: torch.Tensor, halo: bool = False, triton: bool = False) -> torch.Tensor:
        """The convolved map; with ``halo`` the first c_q - 1 rows are context only (the rows above a
        block of queries) and the output is that much shorter, else zero rows are padded on top.

        ``triton`` uses the tensor-core kernel of mta_lab.kernels.score_conv, which also zeroes the
        output's future (the caller's mask), for maps whose last row is the query of the last column."""
        left = self.config.left_pad
        if triton:
            from mta_lab.kernels.score_conv import score_conv

            rows = maps_bhqk.shape[2] - (self.halo_rows if halo else 0)
            return score_conv(maps_bhqk, self.weight, left, 0 if halo else self.halo_rows, rows)
        # F.pad order: (key left, key right, query top, query bottom).
        padding = (left, self.config.key_kernel - 1 - left, 0 if halo else self.halo_rows, 0)
        padded_bhqk = F.pad(maps_bhqk, padding)
        if not padded_bhqk.is_cuda:
            # oneDNN's depthwise convolution is 2-3x faster forward+backward in channels-last layout
            # (2 cores, maps from 32x2x50x50 with 2x9 taps to 8x4x256x256 with 6x11).
            padded_bhqk = padded_bhqk.contiguous(memory_format=torch.channels_last)
        kernel_h1qk = self.weight.unsqueeze(1).to(maps_bhqk.dtype)
        return F.conv2d(padded_bhqk, kernel_h1qk, groups=self.weight.shape[0]).contiguous()


class HeadMix(nn.Module):
    """Head mixing within contiguous groups of c_h heads (spec 1.3, Eq. 7):
    new[g, o] = sum_i W[g, o, i] * A[g, i] at every (query, key).

    The weight is [group, out, in] like nn.Linear; the official head convolution stores [in, out],
    so ported kernels are transposed. c_h = n_heads is the official full linear mix.
    """

    def __init__(self, config: HeadMixConfig, n_heads: int):
        super().__init__()
        size = config.size(n_heads)
        self.weight = nn.Parameter(torch.empty(n_heads // size, size, size))  # g, c_out, c_in
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.eye_(self.weight)

    def forward(self, maps_bhqk: torch.Tensor) -> torch.Tensor:
        b, h, q, k = maps_bhqk.shape
        groups, size, _ = self.weight.shape
        maps_bgcx = maps_bhqk.reshape(b, groups, size, q * k)
        mixed_bgcx = self.weight.to(maps_bhqk.dtype) @ maps_bgcx
        return mixed_bgcx.reshape(b, h, q, k)


class HeadOutNorm(nn.Module):
    """Per-head RMSNorm over head_dim (one weight shared by all heads), a fixed depth factor, then a
    sigmoid gate computed from the normalised output (spec 1.5)."""

    def __init__(self, config: OutNormConfig, head_dim: int, depth_scale: float):
        super().__init__()
        self.rms = RMSNorm(head_dim, config.eps, scale=depth_scale) if config.norm else None
        gate_dim = {GateKind.none: 0, GateKind.scalar: 1, GateKind.elementwise: head_dim}[config.gate]
        self.gate = nn.Linear(head_dim, gate_dim) if gate_dim else None

    def forward(self, out_bthd: torch.Tensor) -> torch.Tensor:
        if self.rms is not None:
            out_bthd = self.rms(out_bthd)
        if self.gate is not None:
            out_bthd = out_bthd * torch.sigmoid(self.gate(out_bthd))
        return out_bthd
