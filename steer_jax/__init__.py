"""steer-jax: STEER, confidence-guided stepwise routing between a small and a large LLM, in JAX."""

from steer_jax.decoding import GenerateResult, generate
from steer_jax.modeling import CheckpointError, ConfigError, Model, ModelConfig, load_model, load_tokenizer

from steer_jax.runner import Summary, run, sweep
from steer_jax.steer import SteerOptions, SteerResult, Trace, steer

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "GenerateResult", "Model", "ModelConfig",
           "SteerOptions", "SteerResult", "Summary", "Trace", "generate", "load_model",
           "load_tokenizer", "run", "steer", "sweep"]
