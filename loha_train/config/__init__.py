"""The run configuration: YAML schema (schema.py), reading and overrides (loading.py), type checks (check.py),
value rules (rules.py), doc table (doc.py).

The schema's public names are re-exported here, so callers write `from loha_train.config import Config`.
"""

from loha_train.config.errors import ConfigError, ConfigProblem
from loha_train.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from loha_train.config.schema import (
    ADAPTIVE_OPTIMIZERS,
    SCHEMA,
    Config,
    DataConfig,
    EMAConfig,
    ModelConfig,
    NetworkConfig,
    OutputConfig,
    SampleConfig,
    SamplePrompt,
    SubsetConfig,
    TrainConfig,
    default_lr,
    resolved_prompts,
)

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "SCHEMA",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "DataConfig",
    "EMAConfig",
    "ModelConfig",
    "NetworkConfig",
    "OutputConfig",
    "SampleConfig",
    "SamplePrompt",
    "SubsetConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "default_lr",
    "dump_config",
    "load_config",
    "resolved_prompts",
]
