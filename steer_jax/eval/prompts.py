"""Prompts: per-benchmark instructions, laid out for each model family, rendered by the tokenizer's
own chat template.

Families:
- "qwen-math" (Qwen2.5-Math-*-Instruct): the model's trained system prompt on math, "Please reason
  step by step, and put your final answer within \\boxed{}."; elsewhere its first sentence only.
- "qwen" (Qwen2.5-*-Instruct): the same system prompt on math; on the broad benchmarks no system
  message, so the template's default one ("You are Qwen, ...") stays.
- "gemma" (Gemma 3 -it): the template has no system role (it would fold one into the first user
  turn anyway), so every instruction is written into the user turn.

Every prompt asks for one reasoning step per paragraph: STEER splits steps at a blank line.

The demo benchmark is not math in this sense: its models answer "Answer: N", never \\boxed{}, so it
gets no math system prompt; its instruction is worded in the demo tokenizer's own words.

Gemma note: the shared gemma-3-4b-it folder has tokenizer_config.json and chat_template.json but
neither tokenizer.json nor tokenizer.model. transformers 5.24 still builds a GemmaTokenizer from it
offline whose chat template renders correctly, but it knows only the added special tokens (ordinary
text encodes to <unk>), so use it for rendering prompts, not for encoding them.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from steer_jax.eval.benchmarks import DEMO, MATH_BENCHMARKS, canonical_name
from steer_jax.eval.example import Example
from steer_jax.eval.demo_task import INSTRUCTION as DEMO_INSTRUCTION

FAMILIES = ("qwen-math", "qwen", "gemma")

MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
BROAD_SYSTEM = "Please reason step by step."
STEP_FORMAT = "Write one reasoning step per paragraph, with a blank line between consecutive steps."

_KORBENCH_ROLE = {
    "cipher": (
        "You are an assistant skilled at encryption and decryption. Apply the cipher rule below "
        "exactly as written, operation by operation, and follow its notation.",
        "Cipher Rule",
    ),
    "counterfactual": (
        "You are an assistant who reasons inside a given story world. Answer from the rules and "
        "facts of the story below, even where they contradict the real world.",
        "Story Rule",
    ),
    "logic": (
        "You are an assistant for logical reasoning under custom rules. Apply the logic rule below "
        "exactly as defined and use its notation and symbols.",
        "Logic Rule",
    ),
}


class ChatTokenizer(Protocol):
    chat_template: Any

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


def _task_text(example: Example, key: str) -> tuple[str, bool]:
    """The user-turn text for a benchmark and whether it is a math prompt (system prompt wanted)."""
    if key in MATH_BENCHMARKS:
        return example.question.strip(), True
    if key == DEMO:
        return f"{example.question.strip()}\n\n{DEMO_INSTRUCTION}", False
    if key == "acpbench":
        text = (
            f"{example.question.strip()}\n\n"
            "Reason step by step about the planning problem. "
            f"{STEP_FORMAT} Then give the letter of the correct option (A, B, C or D) in "
            "\\boxed{}, for example \\boxed{A}."
        )
        return text, False
    if key == "musique":
        text = (
            "Answer the question below. It needs several facts combined: state each fact you use "
            f"in its own step. {STEP_FORMAT} Finish with a short answer (a name, a date, a number "
            "or a few words, not a sentence) in \\boxed{}, for example \\boxed{Paris}.\n\n"
            f"Question: {example.question.strip()}"
        )
        return text, False
    subset = key.removeprefix("korbench_")
    role, rule_heading = _KORBENCH_ROLE[subset]
    text = (
        f"{role}\n\n"
        f"### {rule_heading}:\n\n{example.meta['rule_content'].strip()}\n\n"
        f"### Question:\n{example.question.strip()}\n\n"
        f"Reason step by step. {STEP_FORMAT} End with the final answer in the double square "
        "bracket format the question asks for, e.g. [[answer]].\n\n"
        "### Answer:"
    )
    return text, False


def build_messages(example: Example, benchmark: str, family: str) -> list[dict[str, str]]:
    """Chat messages for one question, laid out the way `family` was trained to read them."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    key = canonical_name(benchmark)
    task, is_math = _task_text(example, key)
    if is_math:
        if family == "gemma":
            return [{"role": "user", "content": f"{task}\n\n{MATH_SYSTEM} {STEP_FORMAT}"}]
        return [
            {"role": "system", "content": MATH_SYSTEM},
            {"role": "user", "content": f"{task}\n\n{STEP_FORMAT}"},
        ]
    if family == "qwen-math":
        # Its template would otherwise add the \\boxed{} system prompt, which contradicts the
        # answer formats of the broad benchmarks (KOR-Bench's [[...]]).
        return [{"role": "system", "content": BROAD_SYSTEM}, {"role": "user", "content": task}]
    return [{"role": "user", "content": task}]


def _template_text(tokenizer: ChatTokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = template.get("default") or next(iter(template.values()), "")
    return str(template)


def detect_family(tokenizer: ChatTokenizer) -> str:
    """The family from the tokenizer's chat template (and its folder name for Qwen-Math)."""
    template = _template_text(tokenizer)
    name = os.path.basename(str(getattr(tokenizer, "name_or_path", "")).rstrip("/")).lower()
    if "<start_of_turn>" in template:
        return "gemma"
    if "<|im_start|>" in template:
        # The Math template carries its system prompt as a default; a renamed copy may not.
        is_math = "Please reason step by step" in template or "math" in name
        return "qwen-math" if is_math else "qwen"
    raise ValueError(
        f"cannot tell the model family of tokenizer {name or type(tokenizer).__name__!r} from its "
        f"chat template; pass family= one of {FAMILIES}"
    )


def render_prompt(
    tokenizer: ChatTokenizer, example: Example, benchmark: str, family: str | None = None
) -> str:
    """The prompt text the model sees, generation prompt included, via the tokenizer's template."""
    if not _template_text(tokenizer):
        raise ValueError("the tokenizer has no chat template to render prompts with")
    messages = build_messages(example, benchmark, family or detect_family(tokenizer))
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
