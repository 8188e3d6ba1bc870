"""Config tree (schema.py) and its YAML/dotlist loading (loading.py)."""

from megafusion.config.loading import load_config, save_config, to_yaml
from megafusion.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)

__all__ = [
    "Config", "ModelConfig", "DataConfig", "ObjectiveConfig", "ParallelConfig", "OptimizerConfig",
    "TrainingConfig", "CheckpointConfig", "LoggingConfig", "load_config", "save_config", "to_yaml",
]
