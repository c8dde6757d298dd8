"""Gemma 3 (text, and the language part of `gemma3` multimodal checkpoints): Hub spelling.

Architecture switches over `transformer.forward`: QK-norm, norms before and after both attention
and MLP, RMSNorm scaling by (1 + w) in float32, embeddings times sqrt(hidden) rounded to the
weight dtype (as HF does), attention scale `query_pre_attn_scalar ** -0.5`, GELU-tanh gated MLP,
and per-layer sliding-window or global attention with their own RoPE bases (global layers carry the
config's rope scaling).
"""

from __future__ import annotations

from typing import Any

from steer_jax.modeling.config import ConfigError, ModelConfig, RopeConfig, eos_ids
from steer_jax.modeling.weights import COMMON, LAYER, Rule

# HF Gemma3TextConfig defaults: real gemma-3 config.json files leave most of these out.
_DEFAULTS = dict(
    vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    tie_word_embeddings=True, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6, layer_types=None,
    final_logit_softcapping=None, attn_logit_softcapping=None, rope_scaling=None,
    rope_parameters=None, use_bidirectional_attention=False, bos_token_id=2, eos_token_id=1,
    pad_token_id=0,
)


def _rope(params: dict[str, Any] | None, default_theta: float, where: str) -> RopeConfig:
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"gemma3: {where} rope_type {rope_type!r} is not supported "
                          "('default', 'linear')")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return RopeConfig(float(params.get("rope_theta", default_theta)), factor)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    eos = hf.get("eos_token_id")
    if hf.get("model_type") == "gemma3":  # multimodal wrapper: the language model's config is nested
        if not isinstance(hf.get("text_config"), dict):
            raise ConfigError("gemma3: multimodal config.json has no 'text_config' object")
        hf = {**hf["text_config"], **({"eos_token_id": eos} if eos is not None else {})}
    c = {**_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if c["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"gemma3: hidden_activation {c['hidden_activation']!r} is not supported")
    if c["attn_logit_softcapping"] is not None:
        raise ConfigError("gemma3: attn_logit_softcapping is not supported (Gemma 3 has none)")
    if c["use_bidirectional_attention"]:
        raise ConfigError("gemma3: use_bidirectional_attention (an encoder variant) is not supported")
    n_layers = int(c["num_hidden_layers"])
    if c["layer_types"] is not None:
        types = list(c["layer_types"])
    else:
        pattern = int(c["sliding_window_pattern"])
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                 for i in range(n_layers)]
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ConfigError(f"gemma3: unknown layer_types {unknown}")
    rp = c["rope_parameters"]
    if rp is not None and ("full_attention" in rp or "sliding_attention" in rp):
        rope_global = _rope(rp.get("full_attention"), c["rope_theta"], "full_attention")
        rope_local = _rope(rp.get("sliding_attention"), c["rope_local_base_freq"], "sliding_attention")
    else:  # pre-v5 layout: rope_scaling applies to the global layers only
        rope_global = _rope({"rope_theta": c["rope_theta"], **(rp or c["rope_scaling"] or {})},
                            c["rope_theta"], "global")
        rope_local = RopeConfig(float(c["rope_local_base_freq"]))
    return ModelConfig(
        family="gemma3",
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=n_layers,
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c["num_key_value_heads"]),
        head_dim=int(c["head_dim"]),
        rms_norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        sliding_layers=tuple(t == "sliding_attention" for t in types),
        sliding_window=int(c["sliding_window"]),
        rope_global=rope_global,
        rope_local=rope_local,
        max_position_embeddings=int(c["max_position_embeddings"]),
        qk_norm=True,
        sandwich_norms=True,
        norm_plus_one=True,
        embed_scale=True,
        activation="gelu_tanh",
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        final_logit_softcap=c["final_logit_softcapping"],
        eos_token_ids=eos_ids(c["eos_token_id"]),
        bos_token_id=c["bos_token_id"],
        pad_token_id=c["pad_token_id"],
    )


RULES: tuple[Rule, ...] = COMMON + (
    Rule(LAYER + r"post_attention_layernorm\.weight", ("layers", "post_attn_norm"), "copy"),
    Rule(LAYER + r"pre_feedforward_layernorm\.weight", ("layers", "mlp_norm"), "copy"),
    Rule(LAYER + r"post_feedforward_layernorm\.weight", ("layers", "post_mlp_norm"), "copy"),
    Rule(LAYER + r"self_attn\.q_norm\.weight", ("layers", "q_norm"), "copy"),
    Rule(LAYER + r"self_attn\.k_norm\.weight", ("layers", "k_norm"), "copy"),
)

# Multimodal checkpoints keep the language model under a prefix (pre-v5 and v5 spellings); the
# vision tower and projector are skipped by name, so their bytes are never read.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
IGNORED: tuple[str, ...] = (
    "vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
)

# Published text_config values (the rest are Gemma3TextConfig defaults).
_KNOWN: dict[str, dict[str, Any]] = {
    "gemma-3-4b-it": dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, eos_token_id=[1, 106]),
    "gemma-3-12b-it": dict(
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, eos_token_id=[1, 106]),
}


KNOWN = tuple(_KNOWN)


def known(name: str) -> ModelConfig:
    return config_from_hf({"model_type": "gemma3_text", **_KNOWN[name]})
