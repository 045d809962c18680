"""Causal self-attention with the Multi-Token Attention stages (spec 1.1).

One module serves every variant: with no stage on it is plain attention through
``scaled_dot_product_attention``; talking heads and MTA switch stages on. Stages that work on the
(query, key) map run on an explicit score map (the reference path, the definition of correct), on
the same map in blocks of query rows (the tiled path), or in the fused O(T)-memory Triton kernel
(``mta_lab.kernels``), as the layer's :class:`LayerExecution` says (decided when the model is built,
``mta_lab.model.execution``); all use the same parameters.

Shape legend: b batch, t positions, h query heads, n key/value heads, d head dim,
q query positions, k key positions (q = k = t).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mta_lab.config import ModelConfig, MTAConfig
from mta_lab.kernels import band_flash, diagonals
from mta_lab.kernels.mta import ConvTaps, fused_mta_attention
from mta_lab.model.execution import AttentionPath, LayerExecution
from mta_lab.model.layers import apply_rope
from mta_lab.model.mechanisms import HeadMix, HeadOutNorm, QKConv
from mta_lab.model.plan import LayerPlan

logger = logging.getLogger(__name__)


class Attention(nn.Module):
    """One layer's attention: q, k, v projections with RoPE, then either SDPA or the score-map path
    with this layer's MTA stages, then the optional per-head output norm and the output projection."""

    def __init__(self, config: ModelConfig, plan: LayerPlan, execution: LayerExecution):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.dropout = config.dropout
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

        mta = plan.mta or MTAConfig()  # all stages off
        self.pre_qk_conv = QKConv(mta.pre_qk_conv, self.n_heads) if mta.pre_qk_conv else None
        self.pre_head_mix = HeadMix(mta.pre_head_mix, self.n_heads) if mta.pre_head_mix else None
        self.post_qk_conv = QKConv(mta.post_qk_conv, self.n_heads) if mta.post_qk_conv else None
        self.post_head_mix = HeadMix(mta.post_head_mix, self.n_heads) if mta.post_head_mix else None
        self.out_norm = (
            HeadOutNorm(mta.out_norm, self.head_dim, plan.out_norm_scale) if mta.out_norm else None
        )
        self.execution = execution
        logger.info("layer %d: %s; on %s", plan.layer_id, plan.describe(), execution.describe())

    def forward(self, x_btd: torch.Tensor, cos_tf: torch.Tensor, sin_tf: torch.Tensor) -> torch.Tensor:
        b, t, _ = x_btd.shape
        q_bthd = apply_rope(self.wq(x_btd).view(b, t, self.n_heads, self.head_dim), cos_tf, sin_tf)
        k_btnd = apply_rope(self.wk(x_btd).view(b, t, self.n_kv_heads, self.head_dim), cos_tf, sin_tf)
        v_btnd = self.wv(x_btd).view(b, t, self.n_kv_heads, self.head_dim)
        q_bhtd, k_bntd, v_bntd = (x.transpose(1, 2) for x in (q_bthd, k_btnd, v_btnd))

        path = self.execution.path
        if path == AttentionPath.sdpa:
            out_bhtd = F.scaled_dot_product_attention(
                q_bhtd,
                k_bntd,
                v_bntd,
                is_causal=True,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        elif path == AttentionPath.fused:
            out_bhtd = self.fused_attention(q_bhtd, k_bntd, v_bntd)
        else:
            out_bhtd = self.score_map_attention(
                q_bhtd, k_bntd, v_bntd, self.execution.tile_rows, self.execution.triton_convs
            )
        out_bthd = out_bhtd.transpose(1, 2)
        if self.out_norm is not None:
            out_bthd = self.out_norm(out_bthd)
        return self.wo(out_bthd.reshape(b, t, self.n_heads * self.head_dim))

    def fused_attention(
        self, q_bhtd: torch.Tensor, k_bntd: torch.Tensor, v_bntd: torch.Tensor
    ) -> torch.Tensor:
        """The same stages as :meth:`score_map_attention`, in O(T) memory (mta_lab.kernels.mta)."""

        def taps(conv: QKConv | None) -> ConvTaps | None:
            return ConvTaps(conv.weight, conv.config.left_pad) if conv is not None else None

        def weight(mix: HeadMix | None) -> torch.Tensor | None:
            return mix.weight if mix is not None else None

        repeat = self.n_heads // self.n_kv_heads  # GQA, as in the reference path
        return fused_mta_attention(
            q_bhtd,
            k_bntd.repeat_interleave(repeat, dim=1),
            v_bntd.repeat_interleave(repeat, dim=1),
            scale=self.head_dim**-0.5,
            pre_conv=taps(self.pre_qk_conv),
            pre_mix=weight(self.pre_head_mix),
            post_conv=taps(self.post_qk_conv),
            post_mix=weight(self.post_head_mix),
            attention=band_flash.band_attention,
            diagonals=diagonals.near_diagonal,
        )

    def score_map_attention(
        self,
        q_bhtd: torch.Tensor,
        k_bntd: torch.Tensor,
        v_bntd: torch.Tensor,
        tile_rows: int | None = None,
        triton_convs: bool = False,
    ) -> torch.Tensor:
        """The reference MTA path: materialises (b, h, q, k) maps; the mask stays (q, k).

        With ``tile_rows`` the same stages run on blocks of that many query rows, each against its
        causal keys only (about half the work of the full map) and recomputed in the backward pass
        (torch.utils.checkpoint): score maps of (b, h, tile_rows + halo, t) instead of (b, h, t, t).
        ``triton_convs`` convolves with mta_lab.kernels.score_conv instead of F.conv2d."""
        t = q_bhtd.shape[2]
        # GQA: each key/value head serves n_heads / n_kv_heads consecutive query heads, and every MTA
        # kernel is per query head, so keys and values are repeated first (spec 1.8).
        k_bhtd = k_bntd.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        v_bhtd = v_bntd.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if tile_rows is None or tile_rows >= t:
            return self._score_map_rows(q_bhtd, k_bhtd, v_bhtd, 0, t, triton_convs)
        blocks = [
            checkpoint(
                self._score_map_rows,
                q_bhtd,
                k_bhtd,
                v_bhtd,
                first,
                min(first + tile_rows, t),
                triton_convs,
                use_reentrant=False,
            )
            for first in range(0, t, tile_rows)
        ]
        return torch.cat(blocks, dim=2)

    def _score_map_rows(
        self,
        q_bhtd: torch.Tensor,
        k_bhtd: torch.Tensor,
        v_bhtd: torch.Tensor,
        first: int,
        end: int,
        triton_convs: bool = False,
    ) -> torch.Tensor:
        """Output rows [first, end) of the score-map stages: [b, h, end - first, d].

        They read keys and values before ``end`` only (later ones are masked) and, through the
        convolutions, the c_q - 1 query rows above each row: the map starts ``halo`` rows higher,
        and each convolution takes its rows above from the map instead of zero padding."""
        start = max(0, first - sum(conv.halo_rows for conv in self._convs()))
        device = q_bhtd.device

        # Scale before the convolution, as the official code does (spec 1.1 step 5). Masks are filled in
        # place: no op before them keeps its output for backward, so no map is copied to be masked.
        scores_bhqk = (q_bhtd[:, :, start:end] @ k_bhtd[:, :, :end].transpose(-2, -1)) * self.head_dim**-0.5
        if self.pre_qk_conv is not None:  # Eq. 5: Conv(Mask_0(scores))
            scores_bhqk, start = self._convolve(
                self.pre_qk_conv,
                scores_bhqk.masked_fill_(_future(start, end, device), 0.0),
                start,
                triton_convs,
            )
        if self.pre_head_mix is not None:
            scores_bhqk = self.pre_head_mix(scores_bhqk)
        # Softmax in fp32 (spec 1.1 step 8): for 16-bit maps torch's softmax accumulates in fp32 and rounds
        # once, the numbers of an fp32 copy without its two fp32 maps. Masked entries become exact zeros.
        probs_bhqk = torch.softmax(
            scores_bhqk.masked_fill_(_future(start, end, device), float("-inf")), dim=-1
        )
        if self.post_qk_conv is not None:  # Eq. 6: Mask_0(Conv(probs)); rows are not renormalised
            probs_bhqk, start = self._convolve(self.post_qk_conv, probs_bhqk, start, triton_convs)
            probs_bhqk = probs_bhqk.masked_fill_(_future(start, end, device), 0.0)
        if self.post_head_mix is not None:
            probs_bhqk = self.post_head_mix(probs_bhqk)
        probs_bhqk = F.dropout(probs_bhqk[:, :, first - start :], p=self.dropout, training=self.training)
        return probs_bhqk @ v_bhtd[:, :, :end]

    @staticmethod
    def _convolve(
        conv: QKConv, maps_bhqk: torch.Tensor, start: int, triton: bool
    ) -> tuple[torch.Tensor, int]:
        """conv on a map of rows [start, end): rows above 0 are zeros; rows above a later start are in
        the map (its first c_q - 1 rows), so the output starts that much lower."""
        return conv(maps_bhqk, halo=start > 0, triton=triton), start + (conv.halo_rows if start > 0 else 0)

    def _convs(self) -> list[QKConv]:
        return [conv for conv in (self.pre_qk_conv, self.post_qk_conv) if conv is not None]


def _future(start: int, end: int, device: torch.device) -> torch.Tensor:
    """[q, k] True where the key is after the query, for queries start..end-1 and keys 0..end-1."""
    return torch.ones(end - start, end, dtype=torch.bool, device=device).triu(start + 1)
