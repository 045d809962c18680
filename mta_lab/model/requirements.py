"""What a model config's execution settings need from the machine, said before anything starts.

``attention_kernel=fused`` and ``score_conv=triton`` run Triton kernels: on CUDA, or on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``). Without them a run would fail at its first step, and a
sweep in every cell, after the set-up was paid for.
"""

from __future__ import annotations

from mta_lab.config import AttentionKernel, ModelConfig, ScoreConvKernel
from mta_lab.model.plan import plan_layers


def unmet_requirements(config: ModelConfig, device_type: str) -> list[str]:
    """One line per setting of ``config`` that cannot run on a ``device_type`` ("cuda", "cpu") here."""
    from mta_lab.kernels import band_flash

    if not any(plan.uses_score_map for plan in plan_layers(config)):
        return []  # every layer takes plain SDPA: the kernel settings are never used
    if band_flash.available() and (device_type == "cuda" or band_flash.interpreting()):
        return []
    where = "Triton (pip install triton) and CUDA, or TRITON_INTERPRET=1 on CPU"
    unmet = []
    if config.attention_kernel == AttentionKernel.fused:
        unmet.append(f"model.attention_kernel=fused needs {where} (allowed here: auto, tiled, reference)")
    if config.score_conv == ScoreConvKernel.triton:
        unmet.append(f"model.score_conv=triton needs {where} (allowed here: auto, torch)")
    return unmet
