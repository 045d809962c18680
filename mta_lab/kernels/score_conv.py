"""The key-query convolution of a causal score map on tensor cores (Triton), forward and backward.

``score_conv(maps, weight, left_pad, top_pad, out_rows)`` computes, per (batch, head)::

    out[r, j] = sum_{a < c_q, e < c_k} w[a, e] * x[r + a - top_pad, j + e - left_pad]

with x and out both masked to the past: a map of R rows and K key columns holds the last R queries
(row r is query K - R + r), entries with a key after their query count as 0 in x and are 0 in out.
That is Mask_0(Conv(Mask_0(x))) of spec Eq. 5 and 6, on full maps (R = K) and on the tiled path's
blocks of rows (the map's last row is the query of its last key column).

Why a kernel: cuDNN's depthwise 6x11 convolution of the maps ran at ~3.5 TFLOP/s on an H100 (B=8,
H=16, T=2048, bf16): 20 ms forward and ~100 ms forward+backward per convolution, most of the reference
MTA layer's time. Here each of the c_q kernel rows is a matrix product: a tile of x's rows (moved by
the row's lag) times a banded Toeplitz matrix T_a[c, j] = w[a, c - j] that slides the row's taps along
the keys. The products run on tensor cores (2 * c_q * (BLOCK_K + TAIL) FLOP per output, fp32
accumulation), each map entry is loaded c_q times per tile instead of once per tap, and tiles wholly
in the future are skipped.

Backward: d x is the same convolution of d out with the kernel flipped in both axes (and the
paddings swapped to the other sides); d w[a, e] = sum_{r, j} d out[r, j] x[r + a - top_pad, j + e -
left_pad], summed per program as the products d out^T @ x_a, whose diagonals are the taps.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl

    from mta_lab.kernels.band_flash import _dot
except ImportError:  # CPU installs without Triton: QKConv uses F.conv2d
    triton = None


@dataclass(frozen=True)
class Tuning:
    """How the kernels are launched on a GPU (the CPU interpreter uses 32 x 32 tiles, so that small
    tests still cross tiles, and ignores the rest). Untuned: no device was at hand to measure;
    ``mta-lab bench kernels`` does."""

    block_rows: int = 64
    block_keys: int = 64
    """Output columns per tile. Each kernel row's product is (block_keys + tail) deep, so FLOPs per
    output grow with it (960 at 64 for 6x11, 576 at 32) while longer products use tensor cores better."""
    warps: int = 4
    stages: int = 2


def score_conv(
    maps_bhrk: torch.Tensor,
    weight_hae: torch.Tensor,
    left_pad: int,
    top_pad: int,
    out_rows: int,
    tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """Mask_0(Conv(Mask_0(maps))): [b, h, out_rows, K] in the maps' dtype (fp32 accumulation), the
    weight [h, c_q, c_k] rounded to that dtype as ``F.conv2d`` would; differentiable in both."""
    return _ScoreConv.apply(maps_bhrk, weight_hae, left_pad, top_pad, out_rows, tuning)


class _ScoreConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, weight, left_pad, top_pad, out_rows, tuning):
        maps = maps.contiguous()
        ctx.save_for_backward(maps, weight)
        ctx.pads, ctx.tuning = (left_pad, top_pad), tuning
        return _convolve(maps, weight, left_pad, top_pad, out_rows, tuning)

    @staticmethod
    def backward(ctx, d_out):
        maps, weight = ctx.saved_tensors
        (left_pad, top_pad), tuning = ctx.pads, ctx.tuning
        _, c_q, c_k = weight.shape
        d_out = d_out.contiguous()
        d_maps = d_weight = None
        if ctx.needs_input_grad[0]:  # the transposed convolution: flipped taps, paddings on the far sides
            flipped = weight.flip(1, 2)
            d_maps = _convolve(d_out, flipped, c_k - 1 - left_pad, c_q - 1 - top_pad, maps.shape[2], tuning)
        if ctx.needs_input_grad[1]:
            d_weight = _weight_grad(d_out, maps, c_q, c_k, left_pad, top_pad, tuning).to(weight.dtype)
        return d_maps, d_weight, None, None, None, None


def masked_conv2d(
    maps_bhrk: torch.Tensor, weight_hae: torch.Tensor, left_pad: int, top_pad: int, out_rows: int
) -> torch.Tensor:
    """What :func:`score_conv` computes, by ``F.conv2d`` on the masked map (full-size intermediates)."""
    rows, keys = maps_bhrk.shape[2:]
    c_q, c_k = weight_hae.shape[1:]
    padded = F.pad(
        maps_bhrk * past_mask(rows, keys, maps_bhrk.device), (left_pad, c_k - 1 - left_pad, top_pad, 0)
    )
    out = F.conv2d(padded, weight_hae.unsqueeze(1).to(maps_bhrk.dtype), groups=weight_hae.shape[0])
    return out[:, :, :out_rows] * past_mask(out_rows, keys, maps_bhrk.device)


def past_mask(rows: int, keys: int, device: torch.device) -> torch.Tensor:
    """[rows, keys] True where the key is at or before the query (row r is query keys - rows + r)."""
    return torch.ones(rows, keys, dtype=torch.bool, device=device).tril(keys - rows)


@functools.cache
def passes_check(device: str, dtype: torch.dtype, query_kernel: int, key_kernel: int, left_pad: int) -> bool:
    """Whether the kernel agrees with :func:`masked_conv2d` on this device and dtype for this kernel
    shape: output and both gradients of a random 100-row map with 140 keys (tiles cut at both edges,
    with and without a halo), once per process. A compiler that mistranslates it (Triton 3.6 computed other
    16-bit tiles wrongly on an H100, see band_flash._padded) then costs speed, not correctness."""
    generator = torch.Generator(device=device).manual_seed(0)

    def random(*shape, dtype=dtype):
        return torch.randn(shape, device=device, generator=generator).to(dtype)

    weight = random(2, query_kernel, key_kernel, dtype=torch.float32)
    with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        for top_pad in (query_kernel - 1, 0):
            maps = random(1, 2, 100, 140)
            out_rows = 100 - (query_kernel - 1) + top_pad
            d_out = random(1, 2, out_rows, 140)
            results = []
            for conv in (score_conv, masked_conv2d):
                leaves = [maps.clone().requires_grad_(), weight.clone().requires_grad_()]
                out = conv(leaves[0], leaves[1], left_pad, top_pad, out_rows)
                out.backward(d_out)
                results.append([out.float(), leaves[0].grad.float(), leaves[1].grad.float()])
            for name, actual, expected in zip(("output", "d_maps", "d_weight"), *results, strict=True):
                error = ((actual - expected).abs().max() / expected.abs().max()).item()
                if not error < 2e-2:  # bf16 rounding is ~4e-3; NaN fails too
                    logger.warning(
                        "score_conv kernel disagrees with F.conv2d on %s (%s, %dx%d kernel, %s error %.2g): "
                        "convolving by F.conv2d instead",
                        device,
                        dtype,
                        query_kernel,
                        key_kernel,
                        name,
                        error,
                    )
                    return False
    return True


def _meta(x: torch.Tensor, key_kernel: int, tuning: Tuning) -> dict:
    """Tiles as tuned on a GPU (32 x 32 in the CPU interpreter), and the extra input columns a tile
    needs on its right (c_k - 1), rounded up to a power of two and to at least 16, the shortest dot
    product."""
    gpu = x.device.type == "cuda"
    return {
        "BLOCK_R": tuning.block_rows if gpu else 32,
        "BLOCK_K": tuning.block_keys if gpu else 32,
        "TAIL": max(16, triton.next_power_of_2(key_kernel - 1)),
        # As in band_flash: IEEE fp32 products for fp32 maps and in the interpreter.
        "PRECISION": "ieee" if x.dtype == torch.float32 or not gpu else "tf32",
    }


def toeplitz(weight_hae: torch.Tensor, block: int, tail: int) -> torch.Tensor:
    """[h, c_q, block + tail, block]: T[h, a, c, j] = w[h, a, c - j] (0 off the kernel), so that a row
    of input columns c0..c0+block+tail-1 times T gives output columns c0+left_pad.. of kernel row a."""
    c_k = weight_hae.shape[2]
    lag_cj = torch.arange(block + tail, device=weight_hae.device)[:, None] - torch.arange(
        block, device=weight_hae.device
    )
    inside_cj = (lag_cj >= 0) & (lag_cj < c_k)
    return weight_hae[:, :, lag_cj.clamp(0, c_k - 1)] * inside_cj


def _convolve(
    maps: torch.Tensor, weight_hae: torch.Tensor, left_pad: int, top_pad: int, out_rows: int, tuning: Tuning
) -> torch.Tensor:
    b, h, rows, keys = maps.shape
    c_q = weight_hae.shape[1]
    meta = _meta(maps, weight_hae.shape[2], tuning)
    taps = toeplitz(weight_hae.to(maps.dtype), meta["BLOCK_K"], meta["TAIL"]).contiguous()
    out = torch.empty(b, h, out_rows, keys, device=maps.device, dtype=maps.dtype)
    grid = (triton.cdiv(out_rows, meta["BLOCK_R"]), triton.cdiv(keys, meta["BLOCK_K"]), b * h)
    _forward[grid](
        maps, taps, out, h, rows, out_rows, keys, top_pad, left_pad, C_Q=c_q, **meta, **_launch(maps, tuning)
    )
    return out


def _weight_grad(
    d_out: torch.Tensor, maps: torch.Tensor, c_q: int, c_k: int, left_pad: int, top_pad: int, tuning: Tuning
) -> torch.Tensor:
    """[h, c_q, c_k] in fp32: each program's sums over its block of rows, then summed here."""
    b, h, rows, keys = maps.shape
    out_rows = d_out.shape[2]
    meta = _meta(maps, c_k, tuning)
    row_blocks = triton.cdiv(out_rows, meta["BLOCK_R"])
    partial = torch.empty(b * h, row_blocks, c_q, c_k, device=maps.device, dtype=torch.float32)
    grid = (row_blocks, c_q, b * h)
    _weight_sums[grid](
        d_out,
        maps,
        partial,
        rows,
        out_rows,
        keys,
        top_pad,
        left_pad,
        C_K=c_k,
        **meta,
        **_launch(maps, tuning),
    )
    return partial.view(b, h, row_blocks, c_q, c_k).sum((0, 2))


def _launch(x: torch.Tensor, tuning: Tuning) -> dict:
    return {"num_warps": tuning.warps, "num_stages": tuning.stages} if x.device.type == "cuda" else {}


if triton is not None:

    @triton.jit
    def _load_past(X, rows, cols, R, K):
        """x[rows, cols] of one (R, K) map whose row r is query K - R + r: zeros outside the map and
        where the key is after the query."""
        inside = (rows[:, None] >= 0) & (rows[:, None] < R) & (cols[None, :] >= 0)
        inside &= cols[None, :] <= K - R + rows[:, None]  # also keeps cols < K
        return tl.load(X + rows[:, None] * K + cols[None, :], mask=inside, other=0.0)

    @triton.jit
    def _forward(
        X, TAPS, OUT, H, R_IN, R_OUT, K, TOP, LEFT,
        C_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One (BLOCK_R, BLOCK_K) tile of out: per kernel row a, x's rows a - TOP lower times T_a."""
        r_block, k_block = tl.program_id(0), tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)  # B * H * R * K can pass 2**31
        X += bh * R_IN * K
        OUT += bh * R_OUT * K
        TAPS += (bh % H) * C_Q * (BLOCK_K + TAIL) * BLOCK_K
        rows = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        first_in = k_block * BLOCK_K - LEFT  # input column under the tile's first tap
        taps_main = tl.arange(0, BLOCK_K)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        taps_tail = (BLOCK_K + tl.arange(0, TAIL))[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
        if k_block * BLOCK_K <= K - R_OUT + r_block * BLOCK_R + BLOCK_R - 1:  # not wholly in the future
            for a in tl.static_range(C_Q):
                x_rows = rows + a - TOP
                row_taps = TAPS + a * (BLOCK_K + TAIL) * BLOCK_K
                x = _load_past(X, x_rows, first_in + tl.arange(0, BLOCK_K), R_IN, K)
                acc += _dot(x, tl.load(row_taps + taps_main), PRECISION)
                x = _load_past(X, x_rows, first_in + BLOCK_K + tl.arange(0, TAIL), R_IN, K)
                acc += _dot(x, tl.load(row_taps + taps_tail), PRECISION)
        acc = tl.where(cols[None, :] <= K - R_OUT + rows[:, None], acc, 0.0)  # Mask_0 after the conv
        mask = (rows[:, None] < R_OUT) & (cols[None, :] < K)
        tl.store(OUT + rows[:, None] * K + cols[None, :], acc.to(OUT.dtype.element_ty), mask=mask)

    @triton.jit
    def _weight_sums(
        G, X, PARTIAL, R_IN, R_OUT, K, TOP, LEFT,
        C_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TAIL: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """d w[a, :] from one block of rows: M = sum over key tiles of g^T @ x_a, where M[j, c] pairs
        output column j with input column c - LEFT + j's tile start, so tap e is M's diagonal c - j = e."""
        r_block, a = tl.program_id(0), tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        G += bh * R_OUT * K
        X += bh * R_IN * K
        rows = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        main = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
        tail = tl.zeros([BLOCK_K, TAIL], dtype=tl.float32)
        last_query = tl.minimum(K - R_OUT + r_block * BLOCK_R + BLOCK_R - 1, K - 1)
        for k0 in range(0, last_query + 1, BLOCK_K):  # later key tiles of g are all future: 0
            g = _load_past(G, rows, k0 + tl.arange(0, BLOCK_K), R_OUT, K)
            g_t = tl.trans(g)
            x = _load_past(X, rows + a - TOP, k0 - LEFT + tl.arange(0, BLOCK_K), R_IN, K)
            main += _dot(g_t, x, PRECISION)
            x = _load_past(X, rows + a - TOP, k0 - LEFT + BLOCK_K + tl.arange(0, TAIL), R_IN, K)
            tail += _dot(g_t, x, PRECISION)
        out_col = tl.arange(0, BLOCK_K)[:, None]
        lag_main = tl.arange(0, BLOCK_K)[None, :] - out_col
        lag_tail = BLOCK_K + tl.arange(0, TAIL)[None, :] - out_col
        PARTIAL += ((bh * tl.num_programs(0) + r_block) * tl.num_programs(1) + a) * C_K
        for e in tl.static_range(C_K):
            total = tl.sum(tl.sum(tl.where(lag_main == e, main, 0.0), axis=1), axis=0)
            total += tl.sum(tl.sum(tl.where(lag_tail == e, tail, 0.0), axis=1), axis=0)
            tl.store(PARTIAL + e, total)
