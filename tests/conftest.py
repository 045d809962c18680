from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mta_lab.config import GateKind, HeadMixConfig, MTAConfig, OutNormConfig, QKConvConfig
from mta_lab.model import Attention, plan_layers
from mta_lab.model.layers import rope_tables

# Without a GPU, Triton kernels run through Triton's interpreter (numpy on CPU); it must be switched on
# before the kernels are defined, so before anything imports mta_lab.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MTA_STAGES = ("pre_qk_conv", "pre_head_mix", "post_qk_conv", "post_head_mix")


def build_attention(config, layer_id: int = 0, dtype=torch.float64) -> Attention:
    """The attention module of one layer of ``config``, on CPU."""
    return Attention(config, plan_layers(config)[layer_id]).to(dtype)


def run_attention(layer: Attention, x_btd: torch.Tensor, rope_theta: float) -> torch.Tensor:
    cos, sin = rope_tables(x_btd.shape[1], layer.head_dim, rope_theta, x_btd.device)
    return layer(x_btd, cos, sin)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Give every parameter random values (kernels and mixing weights far from identity)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def every_stage_mta(conv: QKConvConfig, gate: GateKind = GateKind.scalar) -> MTAConfig:
    """Every MTA stage on: grouped (c_h=2) mixing before softmax, full mixing after, norm and gate."""
    return MTAConfig(
        pre_qk_conv=conv,
        pre_head_mix=HeadMixConfig(group_size=2),
        post_qk_conv=conv,
        post_head_mix=HeadMixConfig(),
        out_norm=OutNormConfig(gate=gate),
    )


class MadeTensors(TorchDispatchMode):
    """Records the shape of every tensor that an op returns, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else [out]:
            if isinstance(x, torch.Tensor):
                self.shapes.append((str(func), tuple(x.shape)))
        return out


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenized corpora and trained tokenizers go to a per-session cache, not the user's."""
    os.environ["MTA_LAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def sweep_command(path: Path, *args: str) -> list[str]:
    """``mta-lab sweep PATH`` (full budget) in a fresh interpreter, its MLflow store and runs beside the file."""
    store = ["--tracking-uri", f"sqlite:///{path.parent}/mlflow.db", "--runs-dir", str(path.parent / "runs")]
    return [sys.executable, "-m", "mta_lab.cli", "sweep", str(path), "--profile", "full", *store, *args]
