"""Step boundaries and math tokens, precomputed once per tokenizer over the whole vocabulary.

Detection then runs on device as table lookups: a step ends at a token whose text contains the
delimiter, or at a token that completes a delimiter begun by the previous token of the same step
(the "\n" + "\n..." case of the default "\n\n"). Tokens are decoded one id at a time, so byte-level
pieces that are not valid UTF-8 on their own never match a delimiter made of text.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Digits, arithmetic and comparison operators, LaTeX commands (backslash), braces and brackets.
MATH_CHARS = re.compile(r"[0-9+\-*/=<>^_!\\{}()\[\]|]")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VocabMasks:
    """Per-token tables over the model's vocabulary (rows past the tokenizer's are all False)."""

    has_delimiter: jax.Array  # [V] the token's text contains the delimiter
    ends_with: jax.Array  # [K, V] text ends with delimiter[:k+1], k < len(delimiter) - 1
    starts_with: jax.Array  # [K, V] text starts with delimiter[k+1:]
    is_math: jax.Array  # [V]

    def step_ends(self, prev: jax.Array, token: jax.Array, prev_in_step: jax.Array) -> jax.Array:
        """Whether `token` ends a step, given the step's previous token (if it had one)."""
        split = jnp.any(self.ends_with[:, prev] & self.starts_with[:, token], axis=0)
        return self.has_delimiter[token] | (split & prev_in_step)


def token_texts(tokenizer: Any) -> list[str]:
    """The text of every token id on its own (special tokens as written)."""
    n = len(tokenizer)
    return tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


def build_masks(texts: list[str], vocab_size: int, delimiter: str = "\n\n",
                special_ids: frozenset[int] = frozenset()) -> VocabMasks:
    """Vocabulary tables for `delimiter`, padded with False to the model's `vocab_size`."""
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    if len(texts) > vocab_size:
        raise ValueError(f"the tokenizer has {len(texts)} tokens but the model only {vocab_size}")
    k = len(delimiter) - 1
    has = np.zeros(vocab_size, bool)
    ends = np.zeros((max(k, 1), vocab_size), bool)
    starts = np.zeros((max(k, 1), vocab_size), bool)
    math = np.zeros(vocab_size, bool)
    for i, text in enumerate(texts):
        has[i] = delimiter in text
        for j in range(k):
            ends[j, i] = text.endswith(delimiter[: j + 1])
            starts[j, i] = text.startswith(delimiter[j + 1:])
        math[i] = i not in special_ids and MATH_CHARS.search(text) is not None
    return VocabMasks(jnp.asarray(has), jnp.asarray(ends), jnp.asarray(starts), jnp.asarray(math))


@functools.lru_cache(maxsize=8)
def _masks_for(tokenizer: Any, vocab_size: int, delimiter: str) -> VocabMasks:
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    special |= frozenset(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}))
    return build_masks(token_texts(tokenizer), vocab_size, delimiter, special)


def vocab_masks(tokenizer: Any, vocab_size: int, delimiter: str = "\n\n") -> VocabMasks:
    """`build_masks` for a transformers tokenizer, cached per (tokenizer, vocab, delimiter)."""
    return _masks_for(tokenizer, vocab_size, delimiter)
