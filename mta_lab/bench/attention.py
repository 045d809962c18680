"""``mta-lab bench attention``: one attention layer's core (after the q, k, v projections) timed as
plain SDPA, the reference MTA path (eager and compiled, full score map), the same path in blocks of
query rows (tiled: convolutions by F.conv2d, or by the Triton score-map kernel in ``tiled-triton``)
and the fused kernel, in one process.

Times are medians over repeats, taken with CUDA events on a GPU (wall clock on CPU); "extra memory"
is the peak allocated during one forward+backward minus what was allocated before it (inputs), from
CUDA's allocator or, on CPU, from the tensors the ops return.
Ratios are to SDPA's forward+backward at the same shape. The anchors in the issue use B=8, H=16,
T=2048, d=64, bf16 on an H100.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mta_lab.config import (
    AttentionKernel,
    GateKind,
    HeadMixConfig,
    ModelConfig,
    MTAConfig,
    OutNormConfig,
    QKConvConfig,
    RuntimeConfig,
)


def _conv() -> QKConvConfig:
    return QKConvConfig(query_kernel=6, key_kernel=11)


LAYERS: dict[str, Callable[[], MTAConfig]] = {
    "pre-conv-6x11": lambda: MTAConfig(pre_qk_conv=_conv()),
    "convs-6x11": lambda: MTAConfig(pre_qk_conv=_conv(), post_qk_conv=_conv()),
    "convs-6x11-mix-c2": lambda: MTAConfig(
        pre_qk_conv=_conv(),
        pre_head_mix=HeadMixConfig(group_size=2),
        post_qk_conv=_conv(),
        post_head_mix=HeadMixConfig(group_size=2),
    ),
    "talking-heads": lambda: MTAConfig(pre_head_mix=HeadMixConfig(), post_head_mix=HeadMixConfig()),
    "paper-layer": lambda: MTAConfig(  # the paper's MTA layer: convs and full mixing around softmax
        pre_qk_conv=_conv(),
        pre_head_mix=HeadMixConfig(),
        post_qk_conv=_conv(),
        post_head_mix=HeadMixConfig(),
        out_norm=OutNormConfig(gate=GateKind.scalar),
    ),
}
"""MTA layer configurations that can be benchmarked, by name."""

PATHS = ("sdpa", "reference", "reference-compiled", "tiled", "tiled-triton", "fused")


@dataclass
class Timing:
    layer: str
    path: str
    forward_ms: float | None
    forward_backward_ms: float | None
    extra_gib: float | None
    note: str = ""


@dataclass
class Shape:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype


def bench_attention(
    layers: list[str], paths: list[str], shape: Shape, repeats: int, device: torch.device, progress=None
) -> list[Timing]:
    """Time every (layer, path); SDPA once, as the denominator."""
    timings = []
    if "sdpa" in paths:
        timings.append(_measure("plain", "sdpa", _sdpa, shape, repeats, device))
    for name in layers:
        module = _attention(name, shape, device)
        for path in paths:
            if path == "sdpa":
                continue
            if progress:
                progress(f"{name} · {path}")
            run, note = _core(module, path, device)
            timings.append(
                _measure(name, path, run, shape, repeats, device)
                if run
                else Timing(name, path, None, None, None, note)
            )
    return timings


def _attention(name: str, shape: Shape, device: torch.device):
    """The layer ``name`` on ``device``; each path is timed by calling its method directly."""
    from mta_lab.model import Attention, plan_layers
    from mta_lab.model.execution import choose_execution

    config = ModelConfig(
        dim=shape.heads * shape.head_dim, n_heads=shape.heads, n_layers=1, mta=LAYERS[name]()
    )
    plan = plan_layers(config)[0]
    execution = choose_execution(
        config, plan, RuntimeConfig(attention_kernel=AttentionKernel.reference), device
    )
    module = Attention(config, plan, execution).to(device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # kernels and mixes away from identity, as in training
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(device))
    return module


def _core(module, path: str, device: torch.device):
    from mta_lab.kernels import band_flash

    tile_rows = RuntimeConfig().attention_tile_rows
    if path == "reference":
        return module.score_map_attention, ""
    if path == "reference-compiled":
        return torch.compile(module.score_map_attention), ""
    if path == "tiled":
        return functools.partial(module.score_map_attention, tile_rows=tile_rows), ""
    if not band_flash.available():
        return None, "needs triton"
    if device.type != "cuda" and not band_flash.interpreting():
        return None, "CPU: set TRITON_INTERPRET=1 (slow)"
    if path == "tiled-triton":
        return functools.partial(module.score_map_attention, tile_rows=tile_rows, triton_convs=True), ""
    return module.fused_attention, ""


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _measure(layer: str, path: str, run, shape: Shape, repeats: int, device: torch.device) -> Timing:
    def inputs():
        size = (shape.batch, shape.heads, shape.seq_len, shape.head_dim)
        return [torch.randn(size, device=device, dtype=shape.dtype, requires_grad=True) for _ in range(3)]

    q, k, v = inputs()
    grad = torch.randn_like(q)
    autocast = (
        torch.autocast(device.type, dtype=shape.dtype)
        if shape.dtype != torch.float32
        else contextlib.nullcontext()
    )

    def forward():
        with torch.no_grad(), autocast:
            run(q, k, v)

    def forward_backward():
        with autocast:
            out = run(q, k, v)
        out.backward(grad)

    try:
        forward_backward()  # warm up (compiles, autotunes)
        extra = _extra_memory(forward_backward, device)
        return Timing(
            layer,
            path,
            median_ms(forward, repeats, device),
            median_ms(forward_backward, repeats, device),
            extra,
        )
    except torch.OutOfMemoryError:
        return Timing(layer, path, None, None, None, "out of memory")
    finally:
        q.grad = k.grad = v.grad = None


def median_ms(work, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``work`` over ``repeats`` calls: CUDA events on a GPU, wall clock else."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            work()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def _extra_memory(work, device: torch.device) -> float:
    """Peak GiB allocated by ``work`` beyond what was live before it: CUDA's allocator statistics on a
    GPU; elsewhere, the tensors the dispatcher hands out (:class:`_LiveBytes`)."""
    if device.type != "cuda":
        with _LiveBytes() as tracker:
            work()
        return tracker.peak / 2**30
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    work()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**30


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops return while the mode is on, each counted from its creation
    until its last holder (a tensor, a view, autograd's saved values) lets go of it. Scratch space
    inside an op is not seen, so this is a lower bound of what an allocator would report."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata  # the storage itself; its Python object lives as long as it does
        if key in self._counted:  # a view or an in-place result
            return
        self._counted.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._counted.discard(key)
        self.live -= nbytes
