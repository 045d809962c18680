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

Widths are arbitrary, so dot products run over chunks of ``BLOCK_D`` columns. The forward splits the
value width over programs (``BLOCK_DV`` columns each, one program for the usual d <= 128). In the
backward, one program per key block computes each (query block, key block) tile of ``ds`` and adds its
products into fp32 gradient rows that only it writes, chunk by chunk, so no width multiplies the
recompute; dq comes from a second such pass over query blocks or, with ``Tuning.atomic_dq``, by
atomics from the first.
Everything accumulates in fp32; fp32 inputs use IEEE dot products (no TF32).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton: only the reference below is available
    triton = None


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


@dataclass(frozen=True)
class Tuning:
    """How the kernels are launched on a GPU (the CPU interpreter uses blocks of 16 and ignores the
    rest). Defaults measured on an H100 at the pre-softmax 6x11 shape (q, k 384 wide, v 64; B=8, H=16,
    T=2048, bf16) over blocks 64/128, warps 4/8, stages 1-3: forward 1.66 ms, fwd+bwd 15.0 ms (20.1
    with Triton's defaults); ``mta-lab bench kernels`` measures again."""

    block: int = 64
    """Query and key rows per tile (128-row query blocks measured no faster)."""
    forward_warps: int = 4
    backward_warps: int = 8
    stages: int = 3
    atomic_dq: bool = False
    """One backward pass: the key blocks' programs add dq by fp32 atomics (as FlashAttention-2 does)
    instead of a second pass over query blocks that recomputes every tile of p and ds. Fewer products,
    a summation order that varies from run to run; not yet measured on a GPU."""


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, band: torch.Tensor, tuning: Tuning = Tuning()
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused kernel (differentiable in all four inputs): returns ``(out, lse)``, lse in fp32."""
    return _BandAttention.apply(q, k, v, band, tuning)


class _BandAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, band, tuning):
        ctx.widths, ctx.tuning = (q.shape[-1], v.shape[-1]), tuning
        q, k, v = _padded(q, k, v)
        b, h, t, dqk = q.shape
        dv, w = v.shape[-1], band.shape[-1]
        band = band.float().contiguous()
        out = torch.empty_like(v)
        lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
        meta = _meta(q, dv, tuning)
        grid = (triton.cdiv(t, meta["BLOCK_Q"]), b * h, triton.cdiv(dv, meta["BLOCK_DV"]))
        launch = _launch(q, tuning.forward_warps, tuning.stages)
        _forward[grid](q, k, v, band, out, lse, t, dqk, dv, w, **meta, **launch)
        ctx.save_for_backward(q, k, v, band, out, lse)
        return out[..., : ctx.widths[1]].contiguous() if dv != ctx.widths[1] else out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, band, out, lse = ctx.saved_tensors
        tuning = ctx.tuning
        b, h, t, dqk = q.shape
        dv, w = v.shape[-1], band.shape[-1]
        d_out = F.pad(d_out, (0, dv - d_out.shape[-1])).contiguous()
        # delta_i = sum_c dO[i, c] O[i, c], less dlse_i: d lse_i / d s_ij = p_ij joins the softmax term.
        delta = (d_out.float() * out.float()).sum(-1)
        if d_lse is not None:
            delta = delta - d_lse.float()
        delta = delta.contiguous()
        # fp32 rows, each written by one program only (summed over that program's tiles), or by atomics.
        dq, dk, d_v = (torch.zeros(x.shape, device=x.device, dtype=torch.float32) for x in (q, k, v))
        d_band = torch.zeros_like(band)
        meta = _meta(q, dv, tuning)
        launch = _launch(q, tuning.backward_warps, tuning.stages)
        _backward_keys[(triton.cdiv(t, meta["BLOCK_K"]), b * h)](
            q, k, v, band, d_out, lse, delta, dk, d_v, d_band, dq, t, dqk, dv, w,
            ATOMIC_DQ=tuning.atomic_dq, **meta, **launch,
        )  # fmt: skip
        if not tuning.atomic_dq:
            _backward_queries[(triton.cdiv(t, meta["BLOCK_Q"]), b * h)](
                q, k, v, band, d_out, lse, delta, dq, t, dqk, dv, w, **meta, **launch
            )
        dqk, dv = ctx.widths
        return dq[..., :dqk].to(q.dtype), dk[..., :dqk].to(k.dtype), d_v[..., :dv].to(v.dtype), d_band, None


def _launch(q: torch.Tensor, warps: int, stages: int) -> dict:
    """Warps and pipeline stages on a GPU; nothing for the interpreter."""
    return {"num_warps": warps, "num_stages": stages} if q.device.type == "cuda" else {}


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous operands; on a GPU, widths padded with zeros to whole blocks (64 for q and k, 16 for
    v). Zero columns change no dot product; Triton 3.6 on an H100 computed 16-bit tiles wrongly, even
    out of bounds, when the q/k width was not a multiple of the block (measured with widths of 40)."""
    qk_pad, v_pad = (-q.shape[-1] % 64, -v.shape[-1] % 16) if q.device.type == "cuda" else (0, 0)
    return [
        F.pad(x, (0, pad)) if pad else x.contiguous() for x, pad in ((q, qk_pad), (k, qk_pad), (v, v_pad))
    ]


def _meta(q: torch.Tensor, dv: int, tuning: Tuning) -> dict:
    """Block sizes: ``tuning.block`` rows on a GPU, 16 in the CPU interpreter so that small test
    shapes cross several blocks and chunks; widths in chunks of 64 (16)."""
    gpu = q.device.type == "cuda"
    block = tuning.block if gpu else 16
    return {
        "BLOCK_Q": block,
        "BLOCK_K": block,
        "BLOCK_D": 64 if gpu else 16,
        "BLOCK_DV": min(max(triton.next_power_of_2(dv), 16), 128) if gpu else 16,
        # Triton's CPU interpreter multiplies 16-bit floats wrongly (3.9): there, dot products run in fp32.
        "PRECISION": "ieee" if q.dtype == torch.float32 or not gpu else "tf32",
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
    def _add_tile(X, rows, dims, T, D, x):
        """x[rows, dims] += x in an fp32 matrix (T, D) whose rows only this program writes."""
        mask = (rows[:, None] < T) & (dims[None, :] < D)
        pointers = X + rows[:, None] * D + dims[None, :]
        tl.store(pointers, tl.load(pointers, mask=mask, other=0.0) + x, mask=mask)

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
    def _recompute(
        Q, K, V, BAND, DO, LSE, DELTA, rows, cols, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """A tile of p (from the saved lse) and ds = p * (dO v^T - delta), and where the band is.
        Rows past T get p = 0."""
        s, in_band = _scores(Q, K, BAND, rows, cols, T, DQK, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION)
        lse = tl.load(LSE + rows, mask=rows < T, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < T, other=0.0)
        p = tl.exp(s - lse[:, None])
        dp = _d_probs(V, DO, rows, cols, T, DV, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION)
        return p, p * (dp - delta[:, None]), in_band

    @triton.jit
    def _forward(
        Q, K, V, BAND, OUT, LSE, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One block of queries and BLOCK_DV columns of the output: online softmax over key blocks."""
        q_block, bh, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        Q += bh * T * DQK
        K += bh * T * DQK
        V += bh * T * DV
        BAND += bh * T * W
        rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        dims = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
        row_max = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_DV], dtype=tl.float32)
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
    def _backward_keys(
        Q, K, V, BAND, DO, LSE, DELTA, DK, DVOUT, DBAND, DQ, T, DQK, DV, W, ATOMIC_DQ: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One block of keys: dv[j] = sum_i p[i, j] dO[i], dk[j] = sum_i ds[i, j] q[i] off the band, and
        d band = ds on it (each (row, lag) of the band lies in exactly one key block). With ATOMIC_DQ,
        also dq[i] += ds[i, j] k[j] by atomics (rows that other key blocks' programs add to as well)."""
        k_block, bh = tl.program_id(0), tl.program_id(1)
        Q += bh * T * DQK
        K += bh * T * DQK
        V += bh * T * DV
        BAND += bh * T * W
        DBAND += bh * T * W
        DO += bh * T * DV
        DK += bh * T * DQK
        DVOUT += bh * T * DV
        DQ += bh * T * DQK
        LSE += bh * T
        DELTA += bh * T
        cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        for q0 in range((k_block * BLOCK_K // BLOCK_Q) * BLOCK_Q, T, BLOCK_Q):  # queries that see these keys
            rows = q0 + tl.arange(0, BLOCK_Q)
            p, ds, in_band = _recompute(
                Q, K, V, BAND, DO, LSE, DELTA, rows, cols, T, DQK, DV, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION
            )  # fmt: skip
            lag = rows[:, None] - cols[None, :]
            tl.store(DBAND + rows[:, None] * W + lag, ds, mask=in_band)
            ds = tl.where(in_band, 0.0, ds)
            for d0 in range(0, DV, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                do = _tile(DO, rows, dims, T, DV)
                _add_tile(DVOUT, cols, dims, T, DV, _dot(tl.trans(p.to(do.dtype)), do, PRECISION))
            for d0 in range(0, DQK, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                q = _tile(Q, rows, dims, T, DQK)
                _add_tile(DK, cols, dims, T, DQK, _dot(tl.trans(ds.to(q.dtype)), q, PRECISION))
                if ATOMIC_DQ:
                    k = _tile(K, cols, dims, T, DQK)
                    mask = (rows[:, None] < T) & (dims[None, :] < DQK)
                    pointers = DQ + rows[:, None] * DQK + dims[None, :]
                    tl.atomic_add(pointers, _dot(ds.to(k.dtype), k, PRECISION), mask=mask)

    @triton.jit
    def _backward_queries(
        Q, K, V, BAND, DO, LSE, DELTA, DQ, T, DQK, DV, W,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One block of queries: dq[i] = sum_j ds[i, j] k[j] off the band."""
        q_block, bh = tl.program_id(0), tl.program_id(1)
        Q += bh * T * DQK
        K += bh * T * DQK
        V += bh * T * DV
        BAND += bh * T * W
        DO += bh * T * DV
        DQ += bh * T * DQK
        LSE += bh * T
        DELTA += bh * T
        rows = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        for k0 in range(0, tl.minimum((q_block + 1) * BLOCK_Q, T), BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            _, ds, in_band = _recompute(
                Q, K, V, BAND, DO, LSE, DELTA, rows, cols, T, DQK, DV, W, BLOCK_Q, BLOCK_K, BLOCK_D, PRECISION
            )  # fmt: skip
            ds = tl.where(in_band, 0.0, ds)
            for d0 in range(0, DQK, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                k = _tile(K, cols, dims, T, DQK)
                _add_tile(DQ, rows, dims, T, DQK, _dot(ds.to(k.dtype), k, PRECISION))
