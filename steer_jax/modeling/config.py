"""One frozen config for the decoder-only transformers steer-jax runs.

Qwen2 and Gemma 3 are the same computation with different switches (QKV bias, QK-norm, sandwich
norms, (1 + w) RMSNorm, scaled embeddings, sliding-window layers, two RoPE bases), so a single
dataclass describes both and a single forward in `transformer.py` runs both. How each family spells
its config and tensors on the Hub lives in `qwen2.py` and `gemma3.py`; `families.from_hf_config`
dispatches to them by `model_type`.

The config is hashable (tuples only), so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

Family = Literal["qwen2", "gemma3"]


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be turned into a supported model."""


def eos_ids(value: Any) -> tuple[int, ...]:
    """config.json's eos_token_id (absent, one id, or a list) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind: base, and linear position scaling (1.0: none)."""

    theta: float
    linear_factor: float = 1.0

    def inv_freq(self, head_dim: int) -> np.ndarray:
        # float64 on host then float32, as HF computes its float32 inverse frequencies.
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
        return (1.0 / (self.theta**exponents)).astype(np.float32) / np.float32(self.linear_factor)


@dataclasses.dataclass(frozen=True)
class Execution:
    """How this machine runs a model, chosen once when the model is built (`execution.choose`,
    which `load_model` calls); `execution.py` is the one place that reads it."""

    scan_layers: bool = True  # layers stacked under `lax.scan`; False: per-layer, unrolled
    cpu_kernels: bool = False  # dense weights packed for steer-jax's CPU kernels (`panel_matmul`)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_embeddings: bool
    # True per layer where attention is limited to the last `sliding_window` positions.
    sliding_layers: tuple[bool, ...]
    sliding_window: int | None
    rope_global: RopeConfig
    rope_local: RopeConfig
    max_position_embeddings: int
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False  # Gemma: extra norms after attention and after the MLP
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w), in float32
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    activation: Literal["silu", "gelu_tanh"] = "silu"
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power; None: head_dim
    final_logit_softcap: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    value_head: bool = False  # a process reward model: a linear head on the last hidden state
    execution: Execution = Execution()  # not the checkpoint's: how this machine runs it

    def __post_init__(self) -> None:
        if len(self.sliding_layers) != self.num_layers:
            raise ConfigError(
                f"{len(self.sliding_layers)} layer types for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if any(self.sliding_layers) and not self.sliding_window:
            raise ConfigError("sliding-window layers need a positive sliding_window")

    @property
    def attn_scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5
