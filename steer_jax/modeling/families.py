"""The supported model families: a checkpoint's config.json to a `ModelConfig`, and the known
checkpoints by name, from their published config.json, so users (and the FLOPs bill) can name
them without a download.

Each family module (`qwen2.py`, `gemma3.py`) says how it spells its config and tensors on the
Hub; this module only dispatches to them, so the config itself knows no family.
"""

from __future__ import annotations

from typing import Any

from steer_jax.modeling import gemma3, qwen2
from steer_jax.modeling.config import ConfigError, ModelConfig

PARSERS = {"qwen2": qwen2.config_from_hf, "gemma3_text": gemma3.config_from_hf,
           "gemma3": gemma3.config_from_hf}
KNOWN = (*qwen2.KNOWN, *gemma3.KNOWN)


def from_hf_config(hf: dict[str, Any]) -> ModelConfig:
    """Build from the dict of a checkpoint's config.json (missing keys take HF's defaults)."""
    model_type = hf.get("model_type")
    if model_type not in PARSERS:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; steer-jax supports {sorted(PARSERS)}")
    return PARSERS[model_type](hf)


def known(name: str) -> ModelConfig:
    """The config of a published checkpoint, by its Hub name without the organisation
    ("Qwen2.5-Math-7B-Instruct", "gemma-3-4b-it"; see `KNOWN`)."""
    for family in (qwen2, gemma3):
        if name in family.KNOWN:
            return family.known(name)
    raise ConfigError(f"unknown checkpoint {name!r}; known: {', '.join(KNOWN)}")
