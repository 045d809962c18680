"""Multi-Token Attention without a (query, key) tensor: MTA moved into one band-FlashAttention call.

The reference path (``mta_lab.model.attention``) materialises every (b, h, q, k) map. Here each
stage is moved into the operands of :func:`mta_lab.kernels.band_flash.band_attention`, exactly:

* Pre-softmax key-query conv (spec 1.2, Eq. 5). With lag a = c_q-1-row and key offset
  e = column - left_pad, conv(S)[i, j] = sum_{a,e} w[a, e] q_{i-a}.k_{j+e} over the terms with
  j+e <= i-a (the input's future is zeroed). Without that condition the sum is the dot product of
  Q'_i = [q_i, q_{i-1}, ...] with K'_j = [sum_e w[a, e] k_{j+e}]_a (width c_q*d); the condition holds
  for every term once i - j >= c_q-1 + right_pad, so only that many diagonals next to the causal
  edge differ. They are computed exactly from the raw scores near the diagonal and given to the
  kernel as its band.
* Pre-softmax head mixing (Eq. 7) is linear in the scores: mixing head h's queries
  [W[h, h'] Q'_{h'}]_{h'} against the group's keys [K'_{h'}]_{h'} (width c_h*c_q*d) mixes the scores.
* Post-softmax key-query conv (Eq. 6): sum_j conv(P)[i, j] v_j = sum_a (P V^(a))_{i-a} - C_i with
  V^(a)_c = sum_e w[a, e] v_{c-e}; the kernel's values are [V^(a)]_a (width c_q*d) and the outputs
  are shifted and summed here. C_i removes the terms that Mask_0 after the conv drops; it reads P
  only on the left_pad diagonals next to the edge, which come from the band and the kernel's lse.
  Those terms carry future values (v_c with c > i) that C_i subtracts again: a past output depends
  on future tokens only through float rounding (tests/test_fused_attention.py bounds it).
* Post-softmax head mixing: head h's output sum_{h'} W[h, h'] A'_{h'} v_h needs every head of the
  group's values under each head's probabilities: values of width c_h*(c_q*d), mixed after.

Everything outside the kernel is O(T) and differentiable by autograd, so gradients reach q, k, v and
every MTA parameter. Wide operands cost FLOPs: c_q*d for the convolutions (6x for 6x11) and c_h
times that for head mixing, which suits small groups; full 16-head mixing is exact here but slow.

Shape legend: b batch, h heads, g groups, i/o heads of a group (in, out), t positions, a query lag,
e key offset, u diagonal (lag between query and key), m look-ahead, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConvTaps:
    """One key-query convolution: weight [h, c_q, c_k] in the official orientation (last row is the
    current query) and the number of zero columns before key 0."""

    weight: torch.Tensor
    left_pad: int

    @property
    def query_kernel(self) -> int:
        return self.weight.shape[1]

    @property
    def key_kernel(self) -> int:
        return self.weight.shape[2]

    @property
    def right_pad(self) -> int:
        return self.key_kernel - 1 - self.left_pad

    def by_lag(self) -> torch.Tensor:
        """[h, a, column]: row a is the query a positions back."""
        return self.weight.flip(1)


BandAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(q, k, v, band) -> (out, lse): the kernel or its materialised reference."""

Diagonals = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(q, k, width) -> raw scores on the first ``width`` diagonals: :func:`near_diagonal` or the Triton
one-pass version, ``mta_lab.kernels.diagonals.near_diagonal``."""


def band_width(pre_conv: ConvTaps | None, post_conv: ConvTaps | None) -> int:
    """Diagonals the kernel must take from the band: where the moved pre-softmax conv is wrong, and
    where the post-softmax correction reads probabilities."""
    pre = pre_conv.query_kernel - 1 + pre_conv.right_pad if pre_conv else 0
    post = post_conv.left_pad if post_conv else 0
    return max(pre, post, 1)


@torch.autocast("cuda", enabled=False)  # dtypes are explicit: operands as q, band and edge in >= fp32
@torch.autocast("cpu", enabled=False)
def fused_mta_attention(
    q_bhtd: torch.Tensor,
    k_bhtd: torch.Tensor,
    v_bhtd: torch.Tensor,
    *,
    scale: float,
    pre_conv: ConvTaps | None = None,
    pre_mix: torch.Tensor | None = None,
    post_conv: ConvTaps | None = None,
    post_mix: torch.Tensor | None = None,
    attention: BandAttention,
    diagonals: Diagonals | None = None,
) -> torch.Tensor:
    """Causal MTA attention output [b, h, t, d], equal to the reference score-map path.

    k and v have one head per query head (GQA repeated by the caller, as in the reference). Mixing
    weights are [groups, out, in]; ``attention`` is the band kernel or its materialised reference,
    ``diagonals`` makes the raw scores near the diagonal (default: :func:`near_diagonal`)."""
    diagonals = diagonals or near_diagonal
    b, h, t, d = q_bhtd.shape
    width = band_width(pre_conv, post_conv)
    if pre_conv is None:
        queries, keys = q_bhtd * scale, k_bhtd
        band_bhtu = diagonals(q_bhtd, k_bhtd, width) * scale
    else:
        queries, keys = lagged_queries(q_bhtd, pre_conv.query_kernel) * scale, filtered_keys(k_bhtd, pre_conv)
        band_bhtu = conv_band(q_bhtd, k_bhtd, pre_conv, width, scale, diagonals)
    if pre_mix is not None:
        queries, keys, band_bhtu = mix_scores(queries, keys, band_bhtu, pre_mix)

    groups, size = (h, 1) if post_mix is None else post_mix.shape[:2]
    values = filtered_values(v_bhtd, post_conv, groups, size)  # b, h, t, size * lags * d
    out_bhtx, lse_bht = attention(queries, keys, values, band_bhtu)
    lags = post_conv.query_kernel if post_conv else 1
    # out[b, (g, i), t, (o, a, d)]: head i's probabilities on head o's values, moved by lag a.
    out_bgitoad = out_bhtx.view(b, groups, size, t, size, lags, d)
    out_bgitod = sum(_delay(out_bgitoad[..., a, :], a, dim=3) for a in range(lags))
    mix = post_mix if post_mix is not None else torch.ones(h, 1, 1, device=q_bhtd.device, dtype=q_bhtd.dtype)
    out_bgotd = torch.einsum("goi,bgitod->bgotd", mix.to(out_bgitod.dtype), out_bgitod)
    if post_conv is not None and post_conv.left_pad > 0:
        out_bgotd = out_bgotd - _post_conv_edge(band_bhtu, lse_bht, v_bhtd, post_conv, mix)
    return out_bgotd.reshape(b, h, t, d)


def _delay(x: torch.Tensor, lag: int, dim: int) -> torch.Tensor:
    """x moved ``lag`` positions later along ``dim`` (zeros enter at the start)."""
    if lag == 0:
        return x
    if lag >= x.shape[dim]:  # a kernel taller than the sequence
        return torch.zeros_like(x)
    return torch.cat(
        [x.new_zeros(*x.shape[:dim], lag, *x.shape[dim + 1 :]), x.narrow(dim, 0, x.shape[dim] - lag)], dim
    )


def lagged_queries(q_bhtd: torch.Tensor, lags: int) -> torch.Tensor:
    """Q'_i = [q_i, q_{i-1}, ..., q_{i-lags+1}] (zeros before position 0): [b, h, t, lags * d]."""
    return torch.cat([_delay(q_bhtd, a, dim=2) for a in range(lags)], dim=-1)


def filtered_keys(k_bhtd: torch.Tensor, conv: ConvTaps) -> torch.Tensor:
    """K'_j = [sum_e w[a, e] k_{j+e}]_a (zeros outside the sequence): [b, h, t, c_q * d].

    A grouped 2-D convolution with a (c_k, 1) kernel over (position, channel) images, one group per
    head and c_q outputs per group: cuDNN's, instead of a skinny matrix product."""
    b, h, t, d = k_bhtd.shape
    padded = F.pad(k_bhtd, (0, 0, conv.left_pad, conv.right_pad))
    taps = conv.by_lag().to(k_bhtd.dtype).reshape(h * conv.query_kernel, 1, conv.key_kernel, 1)
    keys_bhatd = F.conv2d(padded, taps, groups=h).view(b, h, conv.query_kernel, t, d)
    return keys_bhatd.transpose(2, 3).reshape(b, h, t, conv.query_kernel * d)


def near_diagonal(q_bhtd: torch.Tensor, k_bhtd: torch.Tensor, width: int) -> torch.Tensor:
    """Raw scores on the first ``width`` diagonals, r[i, u] = q_i . k_{i-u} (0 where i < u), >= fp32.
    One multiply-and-sum of slices per diagonal: nothing of size t x width x d is made or kept."""
    wide = _wide(q_bhtd)
    q_bhtd, k_bhtd = q_bhtd.to(wide), k_bhtd.to(wide)
    t = q_bhtd.shape[2]
    diagonals = [
        F.pad((q_bhtd[:, :, u:] * k_bhtd[:, :, : t - u]).sum(-1), (u, 0)) for u in range(min(width, t))
    ]
    diagonals += [q_bhtd.new_zeros(q_bhtd.shape[:3])] * (width - len(diagonals))  # a band wider than t
    return torch.stack(diagonals, dim=-1)


def _wide(x: torch.Tensor) -> torch.dtype:
    """The band's dtype: at least fp32 (it holds scores and probabilities near the diagonal)."""
    return torch.promote_types(x.dtype, torch.float32)


def conv_band(
    q_bhtd: torch.Tensor,
    k_bhtd: torch.Tensor,
    conv: ConvTaps,
    width: int,
    scale: float,
    diagonals: Diagonals,
) -> torch.Tensor:
    """The pre-softmax conv's exact output on diagonals 0..width-1: [b, h, t, width], fp32.

    conv(S)[i, i-u] = sum_{a, x} w[a, u-a-x] r[i-a, x]: the term q_{i-a}.k_{i-u+e} is on diagonal
    x = u-a-e of row i-a, and it is in the (zeroed-future) input exactly when x >= 0."""
    span = width + conv.left_pad  # x = u - a - e reaches width - 1 + left_pad
    raw_bhtx = diagonals(q_bhtd, k_bhtd, span) * scale
    lagged_bhtax = torch.stack([_delay(raw_bhtx, a, dim=2) for a in range(conv.query_kernel)], dim=3)
    device = q_bhtd.device
    u = torch.arange(width, device=device)[:, None, None]
    a = torch.arange(conv.query_kernel, device=device)[None, :, None]
    x = torch.arange(span, device=device)[None, None, :]
    column = u - a - x + conv.left_pad
    inside = (column >= 0) & (column < conv.key_kernel)
    taps_huax = (
        conv.by_lag().to(raw_bhtx.dtype)[:, a.expand_as(column), column.clamp(0, conv.key_kernel - 1)]
        * inside
    )
    return torch.einsum("bhtax,huax->bhtu", lagged_bhtax, taps_huax)


def mix_scores(
    queries: torch.Tensor, keys: torch.Tensor, band_bhtu: torch.Tensor, mix_goi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-softmax head mixing moved into the operands: head (g, o) gets queries
    [W[g, o, i] Q'_(g, i)]_i and keys [K'_(g, i)]_i, and the band is mixed directly."""
    b, h, t, width = queries.shape
    groups, size, _ = mix_goi.shape
    queries_bgitx = queries.view(b, groups, size, t, width)
    mixed_bgotix = torch.einsum("goi,bgitx->bgotix", mix_goi.to(queries.dtype), queries_bgitx)
    keys_bgotix = (
        keys.view(b, groups, 1, size, t, width).transpose(3, 4).expand(b, groups, size, t, size, width)
    )
    band_bgitu = band_bhtu.view(b, groups, size, t, -1)
    band_bgotu = torch.einsum("goi,bgitu->bgotu", mix_goi.to(band_bhtu.dtype), band_bgitu)
    return (
        mixed_bgotix.reshape(b, h, t, size * width),
        keys_bgotix.reshape(b, h, t, size * width),
        band_bgotu.reshape(b, h, t, -1),
    )


def filtered_values(v_bhtd: torch.Tensor, conv: ConvTaps | None, groups: int, size: int) -> torch.Tensor:
    """Values for head (g, i): [V^(a)_(g,i),o]_{o, a} with V^(a)_c = sum_e w_(g,i)[a, e] v_(g,o),c-e:
    [b, h, t, size * c_q * d] (without a conv, c_q = 1 and V^(0) = v)."""
    b, h, t, d = v_bhtd.shape
    v_bgotd = v_bhtd.view(b, groups, size, t, d)
    if conv is None:
        values_bgitod = v_bgotd.permute(0, 1, 3, 2, 4).unsqueeze(2).expand(b, groups, size, t, size, d)
        return values_bgitod.reshape(b, h, t, size * d)
    padded = F.pad(v_bgotd, (0, 0, conv.right_pad, conv.left_pad))
    windows_bgotdw = padded.unfold(3, conv.key_kernel, 1)  # [..., c, :, w] = v_{c + w - right_pad}
    # v_{c-e} with e = column - left_pad sits at w = key_kernel - 1 - column: reverse the columns.
    taps_giaw = conv.by_lag().flip(2).reshape(groups, size, conv.query_kernel, conv.key_kernel)
    values_bgitoad = torch.einsum("bgotdw,giaw->bgitoad", windows_bgotdw, taps_giaw.to(v_bhtd.dtype))
    return values_bgitoad.reshape(b, h, t, size * conv.query_kernel * d)


def _post_conv_edge(
    band_bhtu: torch.Tensor,
    lse_bht: torch.Tensor,
    v_bhtd: torch.Tensor,
    conv: ConvTaps,
    mix_goi: torch.Tensor,
) -> torch.Tensor:
    """C: the part of sum_a (P V^(a))_{i-a} that Mask_0 after the post-softmax conv removes.

    Row r = i-a of P at diagonal u feeds output i through v_{i+m}, m = -(a+u+e) >= 1 (a future
    value), only for u < left_pad. So C_i = sum_m G[i, m] v_{i+m} with
    G[i, m] = sum_{a,u} w[a, -(a+u+m)] P[i-a, u], mixed over heads like the outputs."""
    b, h, t, d = v_bhtd.shape
    groups, size, _ = mix_goi.shape
    edge = conv.left_pad
    diagonal = torch.arange(edge, device=v_bhtd.device)
    exists_tu = torch.arange(t, device=v_bhtd.device)[:, None] >= diagonal[None, :]  # key i-u >= 0
    probs_bhtu = torch.exp(band_bhtu[..., :edge] - lse_bht[..., None]) * exists_tu
    lagged_bhtau = torch.stack([_delay(probs_bhtu, a, dim=2) for a in range(conv.query_kernel)], dim=3)
    m = torch.arange(1, edge + 1, device=v_bhtd.device)[:, None, None]
    a = torch.arange(conv.query_kernel, device=v_bhtd.device)[None, :, None]
    u = diagonal[None, None, :]
    column = edge - (a + u + m)  # e = -(a+u+m), column = e + left_pad
    taps_hmau = conv.by_lag().to(probs_bhtu.dtype)[:, a.expand_as(column), column.clamp(min=0)] * (
        column >= 0
    )
    reach_bhtm = torch.einsum("bhtau,hmau->bhtm", lagged_bhtau, taps_hmau)
    reach_bgotm = torch.einsum(
        "goi,bgitm->bgotm", mix_goi.to(reach_bhtm.dtype), reach_bhtm.view(b, groups, size, t, edge)
    )
    ahead = F.pad(v_bhtd, (0, 0, 0, edge)).unfold(2, edge + 1, 1)[..., 1:]  # [..., i, :, m-1] = v_{i+m}
    ahead_bgotdm = ahead.reshape(b, groups, size, t, d, edge)
    return torch.einsum("bgotm,bgotdm->bgotd", reach_bgotm.to(v_bhtd.dtype), ahead_bgotdm)
