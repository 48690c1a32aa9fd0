"""Typed configuration: schema, presets, YAML loading and ``--set`` overrides."""

from dist_llm_train.config.loader import available_presets, build_config, config_to_yaml, load_config
from dist_llm_train.config.schema import (
    AggregationConfig,
    ClusterConfig,
    CompressionConfig,
    DataConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    SchedulingConfig,
    SyncConfig,
    TelemetryConfig,
    TrainingConfig,
)

__all__ = [
    "AggregationConfig",
    "ClusterConfig",
    "CompressionConfig",
    "DataConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SchedulingConfig",
    "SyncConfig",
    "TelemetryConfig",
    "TrainingConfig",
    "available_presets",
    "build_config",
    "config_to_yaml",
    "load_config",
]
