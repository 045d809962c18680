"""Typed configuration (OmegaConf structured dataclasses). Imports no torch: every layer may use it."""

from mta_lab.config.loading import ConfigError, config_hash, load_config, preset_names, resolved_yaml
from mta_lab.config.model import (
    MTA_STAGES,
    SCORE_MAP_STAGES,
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
)
from mta_lab.config.run import RunConfig
from mta_lab.config.runtime import AttentionKernel, RuntimeConfig, ScoreConvKernel

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
    "MTA_STAGES",
    "SCORE_MAP_STAGES",
    "MTAConfig",
    "ModelConfig",
    "OutNormConfig",
    "QKConvConfig",
    "RunConfig",
    "RuntimeConfig",
    "ScoreConvKernel",
    "config_hash",
    "load_config",
    "preset_names",
    "resolved_yaml",
]
