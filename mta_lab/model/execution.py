"""How each layer computes attention, decided once when the model is built for a device.

Every path computes the same numbers (spec 1.1 is the definition; the tests hold each path to it): plain
``scaled_dot_product_attention`` for a layer with no score-map stage, else the explicit score map
(``reference``), the same stages on blocks of query rows (``tiled``) or the fused O(T)-memory Triton
kernel (``fused``). Which one a layer takes follows from the run's ``runtime`` settings, the layer's
stages, the model's dropout and the device, so it is chosen here and recorded in the run's manifest;
the forward pass only follows it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import torch

from mta_lab.config import AttentionKernel, ModelConfig, RuntimeConfig, ScoreConvKernel
from mta_lab.kernels import band_flash, score_conv
from mta_lab.model.plan import LayerPlan, plan_layers

AUTO_FUSED_MAX_GROUP = 2
"""``auto`` takes the fused path only up to this head-mixing group size. The fused path widens its
operands by the group size; on an H100 (B=8, H=16, T=2048, d=64, bf16, fwd+bwd) it was 2.3x faster
than the full reference map with groups of 2 and 3x (talking heads) to 6.5x (paper layer) slower
with 16."""

MAP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""The dtypes a score map can have (16-bit scores under autocast; softmax's fp32 probabilities):
``score_conv=auto`` takes the Triton convolution only if it agrees with F.conv2d in each."""

TRITON_HERE = "Triton (pip install triton) and CUDA, or TRITON_INTERPRET=1 on CPU"


class AttentionPath(str, Enum):
    """The ways a layer computes attention; the same numbers every way."""

    sdpa = "sdpa"
    """No score-map stage: torch's fused scaled_dot_product_attention."""
    reference = "reference"
    """The materialised (batch, head, query, key) score map."""
    tiled = "tiled"
    """The score-map stages on blocks of query rows, recomputed in the backward pass."""
    fused = "fused"
    """The fused Triton kernel (mta_lab.kernels.mta)."""


class UnmetRequirement(RuntimeError):
    """A runtime setting this machine cannot run; the message names the key and what is allowed."""


@dataclass(frozen=True)
class LayerExecution:
    """How one layer computes, and why."""

    layer_id: int
    path: AttentionPath
    reason: str
    tile_rows: int | None = None
    """Query rows per block (``tiled`` only)."""
    triton_convs: bool = False
    """Whether the tiled path convolves by mta_lab.kernels.score_conv instead of F.conv2d."""

    def describe(self) -> str:
        how = f"the {self.path.value} path"
        if self.path == AttentionPath.tiled:
            how += f" in blocks of {self.tile_rows} query rows"
            how += ", convolutions by Triton" if self.triton_convs else ""
        return f"{how} ({self.reason})"

    def record(self) -> dict:
        """What a run's manifest keeps of it."""
        return {**dataclasses.asdict(self), "path": self.path.value}


def plan_execution(config: ModelConfig, runtime: RuntimeConfig, device: torch.device) -> list[LayerExecution]:
    """Each layer's execution on ``device``, in order; raises :class:`UnmetRequirement`."""
    return [choose_execution(config, plan, runtime, device) for plan in plan_layers(config)]


def unmet_requirement(config: ModelConfig, runtime: RuntimeConfig, device: torch.device) -> str | None:
    """Why ``runtime`` cannot run ``config`` on ``device`` here (one line naming the key), or None:
    said before a run or a sweep starts, not at its first step after the set-up was paid for."""
    try:
        plan_execution(config, runtime, device)
    except UnmetRequirement as unmet:
        return str(unmet)
    return None


def choose_execution(
    config: ModelConfig, plan: LayerPlan, runtime: RuntimeConfig, device: torch.device
) -> LayerExecution:
    layer, kernel = plan.layer_id, runtime.attention_kernel
    if not plan.uses_score_map:
        return LayerExecution(layer, AttentionPath.sdpa, "no score-map stage")
    if kernel == AttentionKernel.fused and not _triton_runs_on(device):
        raise UnmetRequirement(
            f"runtime.attention_kernel=fused needs {TRITON_HERE} (allowed here: auto, tiled, reference)"
        )
    if kernel == AttentionKernel.reference:
        return LayerExecution(layer, AttentionPath.reference, "attention_kernel=reference")
    if kernel == AttentionKernel.tiled:
        path, why = AttentionPath.tiled, "attention_kernel=tiled"
    elif config.dropout > 0:
        path, why = AttentionPath.tiled, "the fused kernel has no attention dropout"
    elif kernel == AttentionKernel.fused:
        path, why = AttentionPath.fused, "attention_kernel=fused"
    elif not (device.type == "cuda" and band_flash.available()):
        path, why = AttentionPath.tiled, "the fused kernel runs on CUDA with Triton"
    elif (widest := _widest_mix(plan, config.n_heads)) > AUTO_FUSED_MAX_GROUP:
        path, why = AttentionPath.tiled, f"head groups of {widest}: the fused kernel is slower there"
    else:
        path, why = AttentionPath.fused, "auto on CUDA"
    if path == AttentionPath.fused:
        return LayerExecution(layer, path, why)
    return LayerExecution(layer, path, why, runtime.attention_tile_rows, _triton_convs(plan, runtime, device))


def _triton_convs(plan: LayerPlan, runtime: RuntimeConfig, device: torch.device) -> bool:
    """Whether the tiled path convolves by mta_lab.kernels.score_conv (``runtime.score_conv``)."""
    convs = [conv for conv in (plan.mta.pre_qk_conv, plan.mta.post_qk_conv) if conv is not None]
    if not convs or runtime.score_conv == ScoreConvKernel.torch:
        return False
    if runtime.score_conv == ScoreConvKernel.triton:
        if not _triton_runs_on(device):
            raise UnmetRequirement(
                f"runtime.score_conv=triton needs {TRITON_HERE} (allowed here: auto, torch)"
            )
        return True
    # auto: checked once per process against F.conv2d on this device, in every dtype a map can have.
    return (
        device.type == "cuda"
        and band_flash.available()
        and all(
            score_conv.passes_check(str(device), dtype, conv.query_kernel, conv.key_kernel, conv.left_pad)
            for conv in convs
            for dtype in MAP_DTYPES
        )
    )


def _triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run on ``device`` here: on CUDA, or on CPU through its interpreter."""
    return band_flash.available() and (device.type == "cuda" or band_flash.interpreting())


def _widest_mix(plan: LayerPlan, n_heads: int) -> int:
    mixes = [mix.size(n_heads) for mix in (plan.mta.pre_head_mix, plan.mta.post_head_mix) if mix]
    return max(mixes, default=1)
