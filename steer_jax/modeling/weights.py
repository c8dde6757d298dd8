"""HF tensor names -> steer-jax parameters: a table of patterns and a few layout conversions.

Our layout keeps heads as their own axis ([D, H, hd] for projections in, [H, hd, D] out) so that
sharding rules can name them, and stacks layers on a leading axis so the forward scans them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np

LAYER = r"model\.layers\.(\d+)\."

Kind = Literal["copy", "row", "transpose", "in_heads", "in_kv_heads", "bias_heads",
               "bias_kv_heads", "out_heads"]


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    path: tuple[str, ...]  # the parameter's path in `module.Transformer` (its state's keys)
    kind: Kind


# Tensors every supported family names the same way (HF's Llama lineage).
COMMON: tuple[Rule, ...] = (
    Rule(r"model\.embed_tokens\.weight", ("embed",), "copy"),
    Rule(r"model\.norm\.weight", ("final_norm",), "copy"),
    Rule(r"lm_head\.weight", ("lm_head",), "copy"),  # [V, D], as the embedding
    Rule(LAYER + r"input_layernorm\.weight", ("layers", "attn_norm"), "copy"),
    Rule(LAYER + r"self_attn\.q_proj\.weight", ("layers", "q"), "in_heads"),
    Rule(LAYER + r"self_attn\.k_proj\.weight", ("layers", "k"), "in_kv_heads"),
    Rule(LAYER + r"self_attn\.v_proj\.weight", ("layers", "v"), "in_kv_heads"),
    Rule(LAYER + r"self_attn\.o_proj\.weight", ("layers", "o"), "out_heads"),
    Rule(LAYER + r"mlp\.gate_proj\.weight", ("layers", "gate"), "transpose"),
    Rule(LAYER + r"mlp\.up_proj\.weight", ("layers", "up"), "transpose"),
    Rule(LAYER + r"mlp\.down_proj\.weight", ("layers", "down"), "transpose"),
)


def match(rules: tuple[Rule, ...], name: str) -> tuple[Rule, int | None] | None:
    """The rule for an HF name, and its layer index (None for non-layer tensors)."""
    for rule in rules:
        m = re.fullmatch(rule.pattern, name)
        if m:
            return rule, (int(m.group(1)) if m.groups() else None)
    return None


def hf_shape(kind: Kind, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a tensor whose (per-layer) steer-jax shape is `shape`."""
    if kind == "copy":
        return shape
    if kind == "row":  # a [1, ...] tensor stored without its leading 1
        return (1, *shape)
    if kind == "transpose":
        return shape[::-1]
    if kind in ("in_heads", "in_kv_heads"):  # [D, H, hd] <- [H * hd, D]
        return (shape[1] * shape[2], shape[0])
    if kind in ("bias_heads", "bias_kv_heads"):  # [H, hd] <- [H * hd]
        return (shape[0] * shape[1],)
    if kind == "out_heads":  # [H, hd, D] <- [D, H * hd]
        return (shape[2], shape[0] * shape[1])
    raise ValueError(kind)


def to_ours(kind: Kind, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Convert an HF tensor (already shape-checked) to the steer-jax layout `shape`."""
    if kind in ("copy", "row", "bias_heads", "bias_kv_heads"):
        return x.reshape(shape)
    return x.T.reshape(shape)  # transpose, in_heads, in_kv_heads, out_heads
