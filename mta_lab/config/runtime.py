"""How a run computes, apart from what it computes.

Every setting here gives the same numbers (to rounding) for the same model config: the explicit score
map, the same map in blocks of query rows, or the fused Triton kernel; cuDNN's or a Triton convolution;
one process or several sharing each batch.
So none of them is part of a run's config hash, and two runs that differ only here are the same cell.
The model library turns them into each layer's execution path once, when the model is built for a
device (``mta_lab.model.execution``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mta_lab.config.model import _check


class AttentionKernel(str, Enum):
    """How layers with score-map stages (key-query convs, head mixing) compute attention."""

    auto = "auto"
    """The fused Triton kernel on CUDA for layers with head groups of at most 2 (measured faster there),
    else ``tiled``."""
    reference = "reference"
    """Always the materialised (batch, head, query, key) score map: the definition of correct."""
    tiled = "tiled"
    """The reference stages on blocks of ``runtime.attention_tile_rows`` queries against their causal keys,
    recomputed in the backward pass: the same numbers, maps of (batch, head, rows, keys), about half
    the work of the full map."""
    fused = "fused"
    """The fused kernel wherever it covers the layer, also on CPU (slowly, under TRITON_INTERPRET=1)."""


class ScoreConvKernel(str, Enum):
    """How the ``tiled`` path convolves its blocks of score maps (the ``reference`` path always uses
    ``F.conv2d``, the definition)."""

    auto = "auto"
    """``triton`` on CUDA with Triton once the kernel has agreed with ``F.conv2d`` on the device (checked
    once per process; a mismatch logs a warning), else ``torch``."""
    torch = "torch"
    """``F.conv2d`` with one group per head (cuDNN on a GPU)."""
    triton = "triton"
    """The Toeplitz tensor-core kernel (mta_lab.kernels.score_conv); on CPU only under
    TRITON_INTERPRET=1, slowly."""


@dataclass
class RuntimeConfig:
    """Execution settings of the layers with score-map stages (key-query convolutions, head mixing), and
    the processes a run trains on."""

    attention_kernel: AttentionKernel = AttentionKernel.auto
    """Fused kernel, tiled or full reference score map for MTA layers; the same numbers every way."""
    attention_tile_rows: int = 128
    """Query rows per block of the ``tiled`` path (fastest of 64-512 on CPU; memory grows with it)."""
    score_conv: ScoreConvKernel = ScoreConvKernel.auto
    """Kernel of the key-query convolutions on the ``tiled`` path; the same numbers either way."""
    devices: int = 1
    """Processes that train the run together with DDP: GPUs on CUDA, CPU processes (gloo) otherwise.
    ``train.batch_size`` is the global batch, split evenly between them, so a run computes the same thing
    with any number (up to the order of reductions)."""

    def __post_init__(self) -> None:
        rows = self.attention_tile_rows
        _check(rows >= 1, "attention_tile_rows", f"{rows} is not allowed; use an integer >= 1")
        _check(self.devices >= 1, "devices", f"{self.devices} is not allowed; use an integer >= 1")
