"""Raw scores next to the causal edge, r[i, u] = q_i . k_{i-u} for u < W, in one pass (Triton).

The fused MTA path needs the exact scores on the W diagonals where its moved convolution is wrong
(``mta_lab.kernels.mta.conv_band``; W = 15 for the paper's 6x11 pre-softmax conv with its 5-column
halo). Made by slices in torch, every diagonal is a pass over q and k in fp32 plus a product of the
same size, forward and backward: ~W full-size passes. Here one program holds a block of queries and
reads each of the W key rows it needs from cache, so q and k are read about once and only the
[t, W] result is written. Backward, likewise in one program per block of rows:

    dq_i = sum_u dr[i, u] k_{i-u},    dk_j = sum_u dr[j+u, u] q_{j+u}

Accumulation is in fp32 (fp64 for fp64 inputs); the result has that dtype, as the band needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: mta.near_diagonal is the torch version
    triton = None


@dataclass(frozen=True)
class Tuning:
    """How the kernels are launched on a GPU (the CPU interpreter uses blocks of 16 rows, so that small
    tests cross blocks). Untuned: ``mta-lab bench kernels`` measures."""

    block_rows: int = 64
    warps: int = 4


def near_diagonal(
    q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, width: int, tuning: Tuning = Tuning()
) -> torch.Tensor:
    """[b, h, t, width]: q_i . k_{i-u} on diagonal u (0 where i < u), in fp32 or wider;
    differentiable in q and k."""
    return _NearDiagonal.apply(q_bhtd, k_bhtd, width, tuning)


class _NearDiagonal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, width, tuning):
        q, k = q.contiguous(), k.contiguous()
        b, h, t, d = q.shape
        r = torch.empty(b, h, t, width, device=q.device, dtype=torch.promote_types(q.dtype, torch.float32))
        grid, meta = _launch(q, tuning)
        _forward[grid](q, k, r, t, d, width, **meta)
        ctx.save_for_backward(q, k)
        ctx.tuning = tuning
        return r

    @staticmethod
    def backward(ctx, d_r):
        q, k = ctx.saved_tensors
        t, d = q.shape[2:]
        d_q, d_k = torch.empty_like(q), torch.empty_like(k)
        grid, meta = _launch(q, ctx.tuning)
        _backward[grid](q, k, d_r.contiguous(), d_q, d_k, t, d, d_r.shape[-1], **meta)
        return d_q, d_k, None, None


def _launch(q: torch.Tensor, tuning: Tuning) -> tuple[tuple[int, int], dict]:
    """The grid (blocks of rows, batch x heads) and the launch settings; the whole head dim in one tile."""
    gpu = q.device.type == "cuda"
    block = tuning.block_rows if gpu else 16
    meta = {"BLOCK_T": block, "BLOCK_D": triton.next_power_of_2(q.shape[-1])}
    if gpu:
        meta["num_warps"] = tuning.warps
    return (triton.cdiv(q.shape[2], block), q.shape[0] * q.shape[1]), meta


if triton is not None:

    @triton.jit
    def _rows(X, rows, dims, T, D, dtype: tl.constexpr):
        """x[rows] of a (T, D) matrix in ``dtype``: zero rows outside 0..T-1."""
        inside = (rows[:, None] >= 0) & (rows[:, None] < T) & (dims[None, :] < D)
        return tl.load(X + rows[:, None] * D + dims[None, :], mask=inside, other=0.0).to(dtype)

    @triton.jit
    def _forward(Q, K, R, T, D, W, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        Q += bh * T * D
        K += bh * T * D
        R += bh * T * W
        wide = R.dtype.element_ty
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, BLOCK_D)
        q = _rows(Q, rows, dims, T, D, wide)
        for u in range(0, W):
            k = _rows(K, rows - u, dims, T, D, wide)  # zero before key 0: r = 0 where i < u
            tl.store(R + rows * W + u, tl.sum(q * k, 1), mask=rows < T)

    @triton.jit
    def _backward(Q, K, DR, DQ, DK, T, D, W, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        block, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
        Q += bh * T * D
        K += bh * T * D
        DQ += bh * T * D
        DK += bh * T * D
        DR += bh * T * W
        wide = DR.dtype.element_ty
        rows = block * BLOCK_T + tl.arange(0, BLOCK_T)
        dims = tl.arange(0, BLOCK_D)
        d_q = tl.zeros([BLOCK_T, BLOCK_D], dtype=wide)
        d_k = tl.zeros([BLOCK_T, BLOCK_D], dtype=wide)
        for u in range(0, W):
            # these rows as queries, against keys u back; and as keys, under the queries u ahead
            d_r = tl.load(DR + rows * W + u, mask=rows < T, other=0.0)
            d_q += d_r[:, None] * _rows(K, rows - u, dims, T, D, wide)
            ahead = rows + u
            d_r = tl.load(DR + ahead * W + u, mask=ahead < T, other=0.0)
            d_k += d_r[:, None] * _rows(Q, ahead, dims, T, D, wide)
        inside = (rows[:, None] < T) & (dims[None, :] < D)
        offsets = rows[:, None] * D + dims[None, :]
        tl.store(DQ + offsets, d_q.to(DQ.dtype.element_ty), mask=inside)
        tl.store(DK + offsets, d_k.to(DK.dtype.element_ty), mask=inside)
