"""Model math and checkpoint loading: no decoding policy, no routing."""

from steer_jax.modeling.config import ConfigError, ModelConfig, RopeConfig
from steer_jax.modeling.export import save_hf
from steer_jax.modeling.loading import (CheckpointError, load_model, load_params, load_tokenizer,
                                        read_config)
from steer_jax.modeling.transformer import KVCache, Model, forward, init_params, logits, num_params

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Model", "ModelConfig", "RopeConfig",
           "forward", "init_params", "load_model", "load_params", "load_tokenizer", "logits",
           "num_params", "read_config", "save_hf"]
