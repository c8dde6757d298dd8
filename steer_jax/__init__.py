"""steer-jax: STEER, confidence-guided stepwise routing between a small and a large LLM, in JAX."""

__version__ = "0.1.0"
