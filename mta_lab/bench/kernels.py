"""``mta-lab bench kernels``: each Triton kernel of the fused and tiled MTA paths under a grid of launch
settings (tiles, warps, pipeline stages, one- or two-pass backward), at the issue's shape, each checked
against its definition before its time counts.

The kernels and their work, for a c_q x c_k pre-softmax convolution with ``both`` padding:

* ``band-attention``: the band-FlashAttention call of the fused pre-conv layer (q and k c_q*d wide, v
  d wide, a band of c_q-1 + (c_k-1)/2 diagonals), against its materialised definition;
* ``score-conv``: the convolution of a full causal score map (B x H x T x T), against ``F.conv2d`` on
  the masked map;
* ``diagonals``: the raw scores on the band's diagonals plus the convolution's halo, against the torch
  slices.

Errors are measured on the first batch element (the definitions materialise what the kernels avoid);
times are medians over repeats with CUDA events, on the whole batch. On CPU the launch settings do not
apply (the interpreter uses fixed small tiles), so only the defaults run.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from mta_lab.bench.attention import Shape, median_ms
from mta_lab.config import QKConvConfig

KERNELS = ("band-attention", "score-conv", "diagonals")
TOLERANCE = 2e-2
"""Largest relative error (max |error| / max |definition|) a setting may show: bf16 rounding is ~4e-3."""


@dataclass
class KernelTiming:
    kernel: str
    setting: str
    default: bool
    error: float | None
    forward_ms: float | None
    forward_backward_ms: float | None
    note: str = ""

    @property
    def correct(self) -> bool:
        return self.error is not None and self.error < TOLERANCE


def bench_kernels(
    kernels: list[str],
    shape: Shape,
    conv: QKConvConfig,
    repeats: int,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> list[KernelTiming]:
    """Every (kernel, launch setting): error against the definition, forward and forward+backward."""
    timings = []
    for kernel in kernels:
        workload = _WORKLOADS[kernel](shape, conv, device)
        for tuning in _settings(kernel, device):
            setting = _describe(tuning)
            if progress:
                progress(f"{kernel} · {setting}")
            timings.append(_measure(kernel, setting, tuning, workload, repeats, device))
    return timings


@dataclass
class _Workload:
    inputs: list[torch.Tensor]  # leaves of the whole batch; the error check uses element 0
    run: Callable[..., torch.Tensor]  # (tuning, *inputs) -> a tensor or a tuple whose first is timed
    definition: Callable[..., torch.Tensor]  # (*inputs) -> the same, by materialising torch ops
    default: object  # the kernel's default Tuning


def _band(conv: QKConvConfig) -> int:
    """Diagonals the fused layer with this pre-softmax convolution takes from its band."""
    from mta_lab.kernels import mta

    return mta.band_width(
        mta.ConvTaps(torch.empty(1, conv.query_kernel, conv.key_kernel), conv.left_pad), None
    )


def _band_attention(shape: Shape, conv: QKConvConfig, device: torch.device) -> _Workload:
    from mta_lab.kernels import band_flash

    b, h, t, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
    generator = torch.Generator(device=device).manual_seed(0)

    def random(*size, dtype=shape.dtype):
        return torch.randn(size, device=device, generator=generator, dtype=torch.float32).to(dtype)

    width = conv.query_kernel * d
    inputs = [
        random(b, h, t, width),
        random(b, h, t, width),
        random(b, h, t, d),
        random(b, h, t, _band(conv)),
    ]
    inputs[0] = inputs[0] * width**-0.5  # scores of unit scale, as attention's are
    return _Workload(
        inputs,
        lambda tuning, *x: band_flash.band_attention(*x, tuning=tuning),
        lambda *x: band_flash.band_attention_reference(*(y.float() for y in x)),
        band_flash.Tuning(),
    )


def _score_conv(shape: Shape, conv: QKConvConfig, device: torch.device) -> _Workload:
    from mta_lab.kernels import score_conv

    b, h, t = shape.batch, shape.heads, shape.seq_len
    generator = torch.Generator(device=device).manual_seed(0)
    maps = torch.randn(b, h, t, t, device=device, generator=generator).to(shape.dtype)
    weight = torch.randn(h, conv.query_kernel, conv.key_kernel, device=device, generator=generator) * 0.1
    top = conv.query_kernel - 1
    return _Workload(
        [maps, weight],
        lambda tuning, maps, weight: score_conv.score_conv(
            maps, weight, conv.left_pad, top, t, tuning=tuning
        ),
        lambda maps, weight: score_conv.masked_conv2d(maps.float(), weight, conv.left_pad, top, t),
        score_conv.Tuning(),
    )


def _diagonals(shape: Shape, conv: QKConvConfig, device: torch.device) -> _Workload:
    from mta_lab.kernels import diagonals, mta

    b, h, t, d = shape.batch, shape.heads, shape.seq_len, shape.head_dim
    generator = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(b, h, t, d, device=device, generator=generator).to(shape.dtype) for _ in range(2))
    width = _band(conv) + conv.left_pad  # what conv_band asks for
    return _Workload(
        [q, k],
        lambda tuning, q, k: diagonals.near_diagonal(q, k, width, tuning=tuning),
        lambda q, k: mta.near_diagonal(q.float(), k.float(), width),
        diagonals.Tuning(),
    )


_WORKLOADS: dict[str, Callable[[Shape, QKConvConfig, torch.device], _Workload]] = {
    "band-attention": _band_attention,
    "score-conv": _score_conv,
    "diagonals": _diagonals,
}


def _settings(kernel: str, device: torch.device) -> Iterator[object]:
    """The default first, then the grid (GPU only: the interpreter ignores launch settings)."""
    from mta_lab.kernels import band_flash, diagonals, score_conv

    default = {
        "band-attention": band_flash.Tuning,
        "score-conv": score_conv.Tuning,
        "diagonals": diagonals.Tuning,
    }
    yield default[kernel]()
    if device.type != "cuda":
        return
    if kernel == "band-attention":
        for block, warps, stages, atomic in itertools.product((64, 128), (4, 8), (2, 3), (False, True)):
            forward_warps = 4 if block == 64 else 8
            yield band_flash.Tuning(block, forward_warps, warps, stages, atomic)
    elif kernel == "score-conv":
        for rows, keys, warps, stages in itertools.product((64, 128), (32, 64), (4, 8), (2, 3)):
            yield score_conv.Tuning(rows, keys, warps, stages)
    else:
        for rows, warps in itertools.product((32, 64, 128), (2, 4, 8)):
            yield diagonals.Tuning(rows, warps)


def _describe(tuning: object) -> str:
    return " ".join(f"{f.name}={getattr(tuning, f.name)}" for f in fields(tuning))


def _measure(
    kernel: str, setting: str, tuning, workload: _Workload, repeats: int, device: torch.device
) -> KernelTiming:
    default = tuning == workload.default
    leaves = [x.detach().requires_grad_() for x in workload.inputs]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    grad = torch.randn_like(first(workload.run(tuning, *(x.detach() for x in leaves))))

    def forward():
        with torch.no_grad():
            workload.run(tuning, *leaves)

    def forward_backward():
        first(workload.run(tuning, *leaves)).backward(grad)

    try:
        error = _error(tuning, workload, grad)
        forward_backward()  # warm up: compiles
        return KernelTiming(
            kernel,
            setting,
            default,
            error,
            median_ms(forward, repeats, device),
            median_ms(forward_backward, repeats, device),
        )
    except Exception as failure:  # a setting the compiler or the device rejects (shared memory, registers)
        return KernelTiming(
            kernel, setting, default, None, None, None, f"{type(failure).__name__}: {failure}"[:80]
        )
    finally:
        for x in leaves:
            x.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _error(tuning, workload: _Workload, grad_full: torch.Tensor) -> float:
    """Max relative error of the output and of every input gradient, on the batch's first element."""
    results = []
    for function in (lambda *x: workload.run(tuning, *x), workload.definition):
        leaves = [(x[:1] if x.dim() == 4 else x).detach().clone().requires_grad_() for x in workload.inputs]
        out = function(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_full[:1].to(out.dtype))
        results.append([out.float()] + [x.grad.float() for x in leaves])
    return max(
        ((actual - expected).abs().max() / expected.abs().max()).item()
        for actual, expected in zip(*results, strict=True)
    )
