"""SpecReason's judge: the prompt the large model answers after each small step, in its own
chat format, and the digit tokens its score is read from."""

from __future__ import annotations

from typing import Any

# SpecReason's judge instruction (our wording of its criteria), asked after each small step.
JUDGE_PROMPT = ("Evaluate the last reasoning step above only for factual correctness and logical "
                "validity given the steps before it; ignore style and usefulness. Score it from 0 "
                "(wrong) to 9 (certainly correct). Reply with the single digit only.")


def judge_suffix(tokenizer: Any) -> list[int]:
    """Tokens that close the assistant turn, ask JUDGE_PROMPT, and open the judge's answer."""
    mark = "\ue000"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark},
         {"role": "user", "content": JUDGE_PROMPT}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]


def digit_tokens(tokenizer: Any) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("specreason needs single-token digits 0-9 in the vocabulary")
    return ids
