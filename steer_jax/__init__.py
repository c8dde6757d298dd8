"""steer-jax: STEER, confidence-guided stepwise routing between a small and a large LLM, in JAX."""

from steer_jax.decoding import GenerateResult, generate
from steer_jax.modeling import CheckpointError, ConfigError, Model, ModelConfig, load_model, load_tokenizer
from steer_jax.steer import SteerOptions, SteerResult, Trace, steer

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "GenerateResult", "Model", "ModelConfig",
           "SteerOptions", "SteerResult", "Summary", "Trace", "generate", "load_model",
           "load_tokenizer", "run", "steer", "sweep"]
_LAZY = {"Summary": "runner", "run": "runner", "sweep": "sweeps"}


def __getattr__(name: str):
    # The runner brings orbax and yaml: a script that only steers or decodes never pays for them.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"steer_jax.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'steer_jax' has no attribute {name!r}")
