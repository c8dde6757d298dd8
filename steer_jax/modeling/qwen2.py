"""Qwen2 / Qwen2.5 / Qwen2.5-Math: how the family spells its config and tensors on the Hub.

The architecture itself is `transformer.forward` with QKV biases, plain RMSNorm (weight times the
normalized input cast back to the activation dtype) and a SiLU-gated MLP.
"""

from __future__ import annotations

from typing import Any

from steer_jax.modeling.config import ConfigError, ModelConfig, RopeConfig, eos_ids
from steer_jax.modeling.weights import COMMON, LAYER, Rule

# HF Qwen2Config defaults, for keys a config.json leaves out.
_DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=None, hidden_act="silu",
    max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000.0, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
    rope_scaling=None, layer_types=None, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    c = {**_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise ConfigError(f"qwen2: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
    rope = c.get("rope_parameters") or c["rope_scaling"] or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"qwen2: rope_type {rope_type!r} is not supported ('default', 'linear')")
    theta = float(rope.get("rope_theta", c["rope_theta"]))
    rope_cfg = RopeConfig(theta, float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0)
    n_layers = int(c["num_hidden_layers"])
    if c["layer_types"] is not None:
        sliding = tuple(t == "sliding_attention" for t in c["layer_types"])
    else:
        sliding = tuple(bool(c["use_sliding_window"]) and i >= c["max_window_layers"]
                        for i in range(n_layers))
    heads = int(c["num_attention_heads"])
    return ModelConfig(
        family="qwen2",
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=int(c["num_key_value_heads"] or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        rms_norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        sliding_layers=sliding,
        sliding_window=int(c["sliding_window"]) if any(sliding) else None,
        rope_global=rope_cfg,
        rope_local=rope_cfg,
        max_position_embeddings=int(c["max_position_embeddings"]),
        qkv_bias=True,
        activation="silu",
        eos_token_ids=eos_ids(c["eos_token_id"]),
        bos_token_id=c["bos_token_id"],
        pad_token_id=c["pad_token_id"],
    )


# HF tensor names below the text model's root -> (parameter path, layout conversion).
RULES: tuple[Rule, ...] = COMMON + (
    # Qwen2's "post-attention" norm is the one before the MLP.
    Rule(LAYER + r"post_attention_layernorm\.weight", ("layers", "mlp_norm"), "copy"),
    Rule(LAYER + r"self_attn\.q_proj\.bias", ("layers", "q_bias"), "bias_heads"),
    Rule(LAYER + r"self_attn\.k_proj\.bias", ("layers", "k_bias"), "bias_kv_heads"),
    Rule(LAYER + r"self_attn\.v_proj\.bias", ("layers", "v_bias"), "bias_kv_heads"),
    # Process reward models (the Skywork-o1-Open-PRM layout): a value head on the last hidden state.
    Rule(r"v_head\.summary\.weight", ("v_head", "w"), "row"),
    Rule(r"v_head\.summary\.bias", ("v_head", "b"), "row"),
)

# The published config.json values (EOS ids merged with generation_config.json, as read_config
# does).
_KNOWN: dict[str, dict[str, Any]] = {
    "Qwen2.5-1.5B-Instruct": dict(
        hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=[151645, 151643]),
    "Qwen2.5-7B-Instruct": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=[151645, 151643]),
}
# The Math models are the same shapes with a 4k context and the base RoPE frequency.
for size in ("1.5B", "7B"):
    _KNOWN[f"Qwen2.5-Math-{size}-Instruct"] = {
        **_KNOWN[f"Qwen2.5-{size}-Instruct"], "rope_theta": 10000.0,
        "max_position_embeddings": 4096}


KNOWN = tuple(_KNOWN)


def known(name: str) -> ModelConfig:
    return config_from_hf({"model_type": "qwen2", "rms_norm_eps": 1e-6, **_KNOWN[name]})

PREFIXES: tuple[tuple[str, str], ...] = ()
IGNORED: tuple[str, ...] = ()
