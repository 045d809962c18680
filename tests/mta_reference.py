"""An independent float64 re-derivation of one MTA attention layer, straight from the paper's
equations and the official semantics. It shares no code with mta_lab.model: RoPE is a complex
rotation, the convolution is Eq. 4 written with the paper's theta indices and explicit shifts, head
mixing is an explicit sum per group, and masking follows Eq. 5/6 literally.

Conventions it checks (documented in mta_lab): the stored key-query kernel W relates to the paper's
theta by W[a, b] = theta[c_q - 1 - a, l - b] (l = left key padding); head-mix weights are
[group, out, in].
"""

from __future__ import annotations

import math

import torch

DTYPE = torch.float64


def rope(x_bthd: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1), seen as complex numbers, by exp(1j * t * theta^(-2i/d))."""
    b, t, h, d = x_bthd.shape
    pairs = torch.view_as_complex(x_bthd.reshape(b, t, h, d // 2, 2).contiguous())
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=DTYPE)
    angles = torch.arange(t, dtype=DTYPE)[:, None] * freqs[None, :]
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]
    return torch.view_as_real(pairs * rotation).reshape(b, t, h, d)


def causal_future(t: int) -> torch.Tensor:
    return torch.tensor([[j > i for j in range(t)] for i in range(t)])


def qk_conv(maps_bhij: torch.Tensor, kernel_hab: torch.Tensor, left_pad: int) -> torch.Tensor:
    """Paper Eq. 4 (without its masking): out[i, j] = sum_{i', j'} theta[i', j'] * A[i - i', j - j'],
    i' in 0..c_q-1 (current and past queries), out-of-range terms 0."""
    _, c_q, c_k = kernel_hab.shape
    t = maps_bhij.shape[-1]
    out = torch.zeros_like(maps_bhij)
    for i_off in range(c_q):
        for j_off in range(left_pad - c_k + 1, left_pad + 1):
            theta_h = kernel_hab[:, c_q - 1 - i_off, left_pad - j_off]  # the documented flip
            shifted = torch.zeros_like(maps_bhij)  # shifted[i, j] = A[i - i_off, j - j_off]
            for i in range(t):
                for j in range(t):
                    if 0 <= i - i_off < t and 0 <= j - j_off < t:
                        shifted[:, :, i, j] = maps_bhij[:, :, i - i_off, j - j_off]
            out += theta_h[None, :, None, None] * shifted
    return out


def head_mix(maps_bhij: torch.Tensor, weight_goi: torch.Tensor) -> torch.Tensor:
    """new[head g*c + o] = sum_in weight[g, o, in] * maps[head g*c + in] (Eq. 7 per group)."""
    groups, c, _ = weight_goi.shape
    out = torch.zeros_like(maps_bhij)
    for g in range(groups):
        for o in range(c):
            for i in range(c):
                out[:, g * c + o] += weight_goi[g, o, i] * maps_bhij[:, g * c + i]
    return out


def attention_layer(x_btd: torch.Tensor, params: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    """One attention layer. ``params`` maps the module's parameter names to float64 tensors; ``spec``
    holds n_heads, n_kv_heads, rope_theta, the left paddings of the convs present, the out-norm's
    eps/depth scale, and whether there is a norm."""
    b, t, _ = x_btd.shape
    h, n_kv = spec["n_heads"], spec["n_kv_heads"]
    q = (x_btd @ params["wq.weight"].T).reshape(b, t, h, -1)
    d = q.shape[-1]
    k = (x_btd @ params["wk.weight"].T).reshape(b, t, n_kv, d)
    v = (x_btd @ params["wv.weight"].T).reshape(b, t, n_kv, d)
    q, k = rope(q, spec["rope_theta"]), rope(k, spec["rope_theta"])
    # Query head j reads key/value head j // (h / n_kv).
    k = torch.stack([k[:, :, j * n_kv // h] for j in range(h)], dim=2)
    v = torch.stack([v[:, :, j * n_kv // h] for j in range(h)], dim=2)

    future = causal_future(t)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    if "pre_qk_conv.weight" in params:  # Eq. 5
        scores = qk_conv(scores.masked_fill(future, 0.0), params["pre_qk_conv.weight"], spec["pre_left_pad"])
    if "pre_head_mix.weight" in params:
        scores = head_mix(scores, params["pre_head_mix.weight"])
    scores = scores.masked_fill(future, -math.inf)
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    if "post_qk_conv.weight" in params:  # Eq. 6, no renormalisation
        probs = qk_conv(probs, params["post_qk_conv.weight"], spec["post_left_pad"]).masked_fill(future, 0.0)
    if "post_head_mix.weight" in params:
        probs = head_mix(probs, params["post_head_mix.weight"])
    out = torch.einsum("bhij,bjhd->bihd", probs, v)  # (b, t, h, d)

    if "out_norm.rms.weight" in params:
        rms = torch.sqrt((out**2).mean(-1, keepdim=True) + spec["out_norm_eps"])
        out = out / rms * params["out_norm.rms.weight"] * spec["out_norm_scale"]
    if "out_norm.gate.weight" in params:
        gate_logit = out @ params["out_norm.gate.weight"].T + params["out_norm.gate.bias"]
        out = out * (1.0 / (1.0 + torch.exp(-gate_logit)))
    return out.reshape(b, t, h * d) @ params["wo.weight"].T
