"""Typed configuration (OmegaConf structured dataclasses). Imports no torch: every layer may use it."""

from mta_lab.config.loading import ConfigError, config_hash, load_config, preset_names, resolved_yaml
from mta_lab.config.model import (
    AttentionKernel,
    ConfigFieldError,
    DepthScaling,
    GateKind,
    HeadMixConfig,
    InitStdFactor,
    KernelInit,
    KeyPadding,
    LayerSelection,
    ModelConfig,
    MTAConfig,
    OutNormConfig,
    QKConvConfig,
    ScoreConvKernel,
)
from mta_lab.config.run import RunConfig

__all__ = [
    "AttentionKernel",
    "ConfigError",
    "ConfigFieldError",
    "DepthScaling",
    "GateKind",
    "HeadMixConfig",
    "InitStdFactor",
    "KernelInit",
    "KeyPadding",
    "LayerSelection",
    "MTAConfig",
    "ModelConfig",
    "OutNormConfig",
    "QKConvConfig",
    "RunConfig",
    "ScoreConvKernel",
    "config_hash",
    "load_config",
    "preset_names",
    "resolved_yaml",
]
