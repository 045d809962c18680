"""Building blocks of the Llama-style network: RMSNorm, rotary embeddings, SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or kept in float64: numerically sensitive steps never run in 16 bits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x / rms(x) * weight * scale over the last dim, computed in >= fp32. ``scale`` is a fixed
    depth factor (DIFF-style rescaling, spec 1.5); 1 for a plain norm."""

    def __init__(self, dim: int, eps: float, scale: float = 1.0):
        super().__init__()
        self.eps = eps
        self.scale = scale
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = normed * at_least_fp32(self.weight)
        if self.scale != 1.0:
            out = out * self.scale
        return out.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, scale={self.scale:.4g}"


def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of the rotary angles, (T, head_dim/2) each, in float64.

    Computed per call rather than cached in a buffer: they cost O(T d), and a buffer would be cast
    to bf16 with the model.
    """
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    angles_tf = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles_tf.cos(), angles_tf.sin()


def apply_rope(x_bthd: torch.Tensor, cos_tf: torch.Tensor, sin_tf: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2i, 2i+1) by position * theta^(-2i/d), as Lingua and the
    official code do (pairs, not halves: weights port unchanged)."""
    x = at_least_fp32(x_bthd)
    cos, sin = cos_tf.to(x.dtype)[:, None, :], sin_tf.to(x.dtype)[:, None, :]  # (T, 1, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x_bthd)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
