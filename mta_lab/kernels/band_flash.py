"""Causal FlashAttention with a score band: the one Triton kernel behind fused MTA.

``band_attention(q, k, v, band)`` computes, per (batch, head) and without any (query, key) tensor::

    s[i, j] = band[i, i - j]  if 0 <= i - j < W      (the W diagonals next to the causal edge)
            = <q[i], k[j]>    if i - j >= W
            = -inf            if j > i
    out[i] = softmax(s[i]) @ v,    lse[i] = logsumexp(s[i])

with any widths of q/k and of v. Multi-Token Attention becomes exactly this once its convolutions and
head mixing are moved into wider queries, keys and values plus a band of W diagonals where the
moved form is wrong (see ``mta_lab.kernels.mta``). Memory is O(T): the forward keeps ``lse``; the
backward recomputes scores tile by tile like FlashAttention-2, and it accepts a gradient of ``lse``
(``ds = p * (dp - (delta - dlse))``) because the post-softmax convolution reads probabilities near
the diagonal.

Each program computes one block of output columns: wide queries and values are split into chunks of
``BLOCK_D`` columns and the scores are recomputed per chunk, which keeps accumulators small for any
width. Everything accumulates in fp32; fp32 inputs use IEEE dot products (no TF32).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: only the reference below is available
    triton = None

BLOCK_Q = 32
BLOCK_K = 32
BLOCK_D = 32


def band_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, materialised: (b, h, t, dqk), (b, h, t, dqk), (b, h, t, dv), (b, h, t, w)."""
    t, w = q.shape[2], band.shape[-1]
    scores_bhqk = q @ k.transpose(-2, -1)
    lag_qk = torch.arange(t, device=q.device)[:, None] - torch.arange(t, device=q.device)[None, :]
    from_band_bhqk = band.gather(-1, lag_qk.clamp(0, w - 1).expand(*q.shape[:2], t, t))
    scores_bhqk = torch.where((lag_qk >= 0) & (lag_qk < w), from_band_bhqk.to(scores_bhqk.dtype), scores_bhqk)
    scores_bhqk = scores_bhqk.masked_fill(lag_qk < 0, float("-inf"))
    lse_bhq = torch.logsumexp(scores_bhqk, dim=-1)
    return torch.softmax(scores_bhqk, dim=-1) @ v, lse_bhq


def available() -> bool:
    """Whether Triton is installed (it comes with CUDA builds of torch; ``pip install triton`` on CPU)."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel (differentiable in all four inputs): returns ``(out, lse)``, lse in fp32."""
    return _BandAttention.apply(q, k, v, band)


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, band):
        b, h, t, dqk = q.shape
        dv, w = v.shape[-1], band.shape[-1]
        q, k, v = (x.contiguous() for x in (q, k, v))
        band = band.float().contiguous()
        out = torch.empty_like(v)
        lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(t, BLOCK_Q), b * h, triton.cdiv(dv, BLOCK_D))
        _forward[grid](q, k, v, band, out, lse, t, dqk, dv, w, **_meta(q))
        ctx.save_for_backward(q, k, v, band, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, band, out, lse = ctx.saved_tensors
        b, h, t, dqk = q.shape
        dv, w = v.shape[-1], band.shape[-1]
        d_out = d_out.contiguous()
        # delta_i = sum_c dO[i, c] O[i, c], less dlse_i: d lse_i / d s_ij = p_ij joins the softmax term.
        delta = (d_out.float() * out.float()).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse.float()
        delta = delta.contiguous()
        dq, dk, d_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_band = torch.zeros_like(band)
        meta, bh = _meta(q), b * h
        _backward_dv[(triton.cdiv(t, BLOCK_K), bh, triton.cdiv(dv, BLOCK_D))](
            q, k, band, d_out, lse, d_v, t, dqk, dv, w, **meta
        )
        _backward_dk[(triton.cdiv(t, BLOCK_K), bh, triton.cdiv(dqk, BLOCK_D))](
            q, k, v, band, d_out, lse, delta, dk, d_band, t, dqk, dv, w, **meta
        )
        _backward_dq[(triton.cdiv(t, BLOCK_Q), bh, triton.cdiv(dqk, BLOCK_D))](
            q, k, v, band, d_out, lse, delta, dq, t, dqk, dv, w, **meta
        )
        return dq, dk, d_v, d_band


def _meta(q: torch.Tensor) -> dict:
    return {
        "BLOCK_Q": BLOCK_Q,
        "BLOCK_K": BLOCK_K,
        "BLOCK_D": BLOCK_D,
        # Triton's CPU interpreter multiplies 16-bit floats wrongly (3.9): there, dot products run in fp32.
        "PRECISION": "ieee" if q.dtype == torch.float32 or q.device.type == "cpu" else "tf32",
    }


if triton is not None:

    @triton.jit
    def _tile(X, rows, dims, T, D):
        """x[rows, dims] of a row-major (T, D) matrix, zeros outside it."""
        return tl.load(
            X + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < T) & (dims[None, :] < D), other=0.0
        )

    @triton.jit
    def _store_tile(X, rows, dims, T, D, x):
        """x[rows, dims] = x, in X's dtype, inside the (T, D) matrix only."""
        mask = (rows[:, None] < T) & (dims[None, :] < D)
        tl.store(X + rows[:, None] * D + dims[None, :], x.to(X.dtype.element_ty), mask=mask)

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        if PRECISION == "ieee":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _scores(
        Q, K, BAND, rows, cols, T, DQK, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One (BLOCK_Q, BLOCK_K) tile of s, and where it came from the band."""
        s = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, DQK, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            q = _tile(Q, rows, dims, T, DQK)
            k = _tile(K, cols, dims, T, DQK)
            s += _dot(q, tl.trans(k), PRECISION)
        lag = rows[:, None] - cols[None, :]
        in_band = (lag >= 0) & (lag < W) & (rows[:, None] < T)
        from_band = tl.load(BAND + rows[:, None] * W + lag, mask=in_band, other=0.0)
        s = tl.where(in_band, from_band, s)
        s = tl.where((lag >= 0) & (cols[None, :] < T), s, float("-inf"))
        return s, in_band

    @triton.jit
    def _d_probs(
        V, DO, rows, cols, T, DV,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dp = dO @ v^T for one tile, over the full value width."""
        dp = tl.zeros([BLOCK_Q, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, DV, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            do = _tile(DO, rows, dims, T, DV)
            v = _tile(V, cols, dims, T, DV)
            dp += _dot(do, tl.trans(v), PRECISION)
        return dp

    @triton.jit
    def _forward(
        Q, K, V, BAND, OUT, LSE, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        q_block, bh, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        Q += bh * T * DQK
        K += bh * T * DQK
        V += bh * T * DV
        BAND += bh * T * W
        rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        row_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, tl.minimum((q_block + 1) * BLOCK_Q, T), BLOCK_K):  # causal: keys <= last row
            cols = k0 + tl.arange(0, BLOCK_K)
            s, _ = _scores(Q, K, BAND, rows, cols, T, DQK, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION)
            new_max = tl.maximum(row_max, tl.max(s, 1))
            rescale = tl.exp(row_max - new_max)
            p = tl.exp(s - new_max[:, None])
            row_sum = row_sum * rescale + tl.sum(p, 1)
            v = _tile(V, cols, dims, T, DV)
            acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, PRECISION)
            row_max = new_max
        acc = acc / row_sum[:, None]
        _store_tile(OUT + bh * T * DV, rows, dims, T, DV, acc)
        if chunk == 0:
            tl.store(LSE + bh * T + rows, row_max + tl.log(row_sum), mask=rows < T)

    @triton.jit
    def _backward_dv(
        Q, K, BAND, DO, LSE, DVOUT, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dv[j] = sum_i p[i, j] dO[i], one block of keys and one chunk of value columns."""
        k_block, bh, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        Q += bh * T * DQK
        K += bh * T * DQK
        BAND += bh * T * W
        DO += bh * T * DV
        LSE += bh * T
        cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        dims = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for q0 in range((k_block * BLOCK_K // BLOCK_Q) * BLOCK_Q, T, BLOCK_Q):  # queries that see these keys
            rows = q0 + tl.arange(0, BLOCK_Q)
            s, _ = _scores(Q, K, BAND, rows, cols, T, DQK, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION)
            lse = tl.load(LSE + rows, mask=rows < T, other=float("inf"))
            p = tl.exp(s - lse[:, None])
            do = _tile(DO, rows, dims, T, DV)
            acc += _dot(tl.trans(p.to(do.dtype)), do, PRECISION)
        _store_tile(DVOUT + bh * T * DV, cols, dims, T, DV, acc)

    @triton.jit
    def _backward_dk(
        Q, K, V, BAND, DO, LSE, DELTA, DK, DBAND, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dk[j] = sum_i ds[i, j] q[i] off the band; the first chunk also writes d band = ds on it."""
        k_block, bh, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        Q += bh * T * DQK
        K += bh * T * DQK
        V += bh * T * DV
        BAND += bh * T * W
        DBAND += bh * T * W
        DO += bh * T * DV
        LSE += bh * T
        DELTA += bh * T
        cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        dims = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for q0 in range((k_block * BLOCK_K // BLOCK_Q) * BLOCK_Q, T, BLOCK_Q):
            rows = q0 + tl.arange(0, BLOCK_Q)
            s, in_band = _scores(Q, K, BAND, rows, cols, T, DQK, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION)
            lse = tl.load(LSE + rows, mask=rows < T, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
            p = tl.exp(s - lse[:, None])
            ds = p * (
                _d_probs(V, DO, rows, cols, T, DV, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION) - delta[:, None]
            )
            if chunk == 0:  # each (row, lag) of the band lies in exactly one key block
                lag = rows[:, None] - cols[None, :]
                tl.store(DBAND + rows[:, None] * W + lag, ds, mask=in_band & (cols[None, :] < T))
            ds = tl.where(in_band, 0.0, ds)
            q = _tile(Q, rows, dims, T, DQK)
            acc += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION)
        _store_tile(DK + bh * T * DQK, cols, dims, T, DQK, acc)

    @triton.jit
    def _backward_dq(
        Q, K, V, BAND, DO, LSE, DELTA, DQ, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """dq[i] = sum_j ds[i, j] k[j] off the band, one block of queries and one chunk of columns."""
        q_block, bh, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        Q += bh * T * DQK
        K += bh * T * DQK
        V += bh * T * DV
        BAND += bh * T * W
        DO += bh * T * DV
        rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, tl.minimum((q_block + 1) * BLOCK_Q, T), BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            s, in_band = _scores(Q, K, BAND, rows, cols, T, DQK, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION)
            p = tl.exp(s - lse[:, None])
            ds = p * (
                _d_probs(V, DO, rows, cols, T, DV, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION) - delta[:, None]
            )
            ds = tl.where(in_band, 0.0, ds)
            k = _tile(K, cols, dims, T, DQK)
            acc += _dot(ds.to(k.dtype), k, PRECISION)
        _store_tile(DQ + bh * T * DQK, rows, dims, T, DQK, acc)
