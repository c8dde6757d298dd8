"""Model math and checkpoint loading: no decoding policy, no routing."""

from steer_jax.modeling.config import ConfigError, ModelConfig, RopeConfig
from steer_jax.modeling.export import save_hf
from steer_jax.modeling.loading import (CheckpointError, load_model, load_params, load_tokenizer,
                                        read_config)
from steer_jax.modeling.transformer import KVCache, Model, forward, logits

__all__ = ["CheckpointError", "ConfigError", "KVCache", "Model", "ModelConfig", "RopeConfig",
           "Transformer", "forward", "init_params", "load_model", "load_params", "load_tokenizer",
           "logits", "num_params", "read_config", "save_hf"]
_LAZY = ("Transformer", "init_params", "num_params")


def __getattr__(name: str):
    # The NNX module brings flax (and flax brings yaml): imported when first asked for, so
    # `import steer_jax` stays light (tests/test_imports.py).
    if name in _LAZY:
        from steer_jax.modeling import module

        return getattr(module, name)
    raise AttributeError(f"module 'steer_jax.modeling' has no attribute {name!r}")
