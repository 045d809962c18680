"""``mta-lab bench train``: training throughput and peak memory of presets, baseline vs talking heads
vs MTA, measured on the model and optimizer alone (no data loading, logging or evaluation).

Every measurement runs in a fresh process, so the CPU's peak resident memory belongs to one variant.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass

from mta_lab.config import RunConfig, load_config

VARIANTS = ("baseline", "talking-heads", "mta")
"""Baselines from the same code path: the preset with its MTA replaced."""


@dataclass
class Measurement:
    preset: str
    variant: str
    parameters: int
    batch: int
    seq_len: int
    tokens_per_s: float
    step_ms: float
    peak_mb: float
    device: str


def variant_config(preset: str, variant: str, overrides: Sequence[str]) -> RunConfig:
    """The preset with no MTA, with the paper's talking heads, or with MTA (its own, else the paper's)."""
    config = load_config(preset, overrides)
    mta = {
        "baseline": None,
        "talking-heads": load_config("paper-talking-heads").model.mta,
        "mta": config.model.mta or load_config("paper-mta").model.mta,
    }[variant]
    return dataclasses.replace(config, model=dataclasses.replace(config.model, mta=mta))


def measure(preset: str, variant: str, overrides: Sequence[str], steps: int, warmup: int) -> Measurement:
    """Time ``steps`` AdamW steps on random tokens after ``warmup`` untimed ones (in this process)."""
    import torch
    import torch.nn.functional as F

    from mta_lab.model import Transformer
    from mta_lab.train.device import training_device

    config = variant_config(preset, variant, overrides)
    device = training_device()
    batch, seq_len = config.train.batch_size, config.data.seq_len
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model, config.runtime, device).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(config.model.vocab_size, (batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return Measurement(
        preset=preset,
        variant=variant,
        parameters=sum(p.numel() for p in model.parameters()),
        batch=batch,
        seq_len=seq_len,
        tokens_per_s=steps * batch * seq_len / elapsed,
        step_ms=1000 * elapsed / steps,
        peak_mb=peak_mb,
        device=torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
    )


def measure_isolated(
    preset: str, variant: str, overrides: Sequence[str], steps: int, warmup: int
) -> Measurement:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (preset, variant, list(overrides), steps, warmup))
