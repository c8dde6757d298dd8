"""Prompts rendered through the real chat templates: Qwen from its tokenizer files, Gemma from its
chat_template.json (directly with jinja, and through the tokenizer transformers builds offline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from steer_jax.eval import BENCHMARKS, build_messages, detect_family, load_benchmark, render_prompt
from steer_jax.eval.prompts import MATH_SYSTEM, STEP_FORMAT

transformers = pytest.importorskip("transformers")

QWEN_DIRS = {"qwen-math": "Qwen2.5-Math-1.5B", "qwen": "Qwen2.5-1.5B-Instruct"}


class JinjaChatTemplate:
    """A tokenizer stand-in that has nothing but a chat template, rendered as transformers does."""

    def __init__(self, template: str, bos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        self.chat_template = template
        self._compiled = env.from_string(template)
        self._bos = bos_token

    @staticmethod
    def _raise(message: str) -> None:
        raise ValueError(message)

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> str:
        assert kwargs.get("tokenize") is False
        return self._compiled.render(
            messages=conversation, bos_token=self._bos, add_generation_prompt=kwargs["add_generation_prompt"]
        )


@pytest.fixture(scope="module")
def examples(shared_data: Path) -> dict[str, Any]:
    return {name: load_benchmark(name, shared_data, limit=2)[1] for name in BENCHMARKS}


@pytest.fixture(scope="module")
def gemma_template(hf_meta: Path) -> JinjaChatTemplate:
    with (hf_meta / "gemma-3-4b-it" / "chat_template.json").open() as f:
        template = json.load(f)["chat_template"]
    return JinjaChatTemplate(template, bos_token="<bos>")


@pytest.mark.parametrize("family", ["qwen-math", "qwen"])
def test_qwen_prompts_from_the_real_tokenizer(hf_meta: Path, examples: dict, family: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(hf_meta / QWEN_DIRS[family])
    assert detect_family(tok) == family
    for name, example in examples.items():
        prompt = render_prompt(tok, example, name)
        assert prompt.startswith("<|im_start|>system\n")
        assert prompt.endswith("<|im_start|>assistant\n")
        assert example.question.strip()[:60] in prompt
        assert STEP_FORMAT in prompt
        if name in ("math500", "omnimath", "aime"):
            assert f"<|im_start|>system\n{MATH_SYSTEM}<|im_end|>" in prompt
        # The prompt must survive tokenization: the chat markers are single special tokens.
        ids = tok(prompt, add_special_tokens=False).input_ids
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_gemma_prompts_from_its_chat_template(gemma_template: JinjaChatTemplate, examples: dict) -> None:
    assert detect_family(gemma_template) == "gemma"
    for name, example in examples.items():
        prompt = render_prompt(gemma_template, example, name)
        assert prompt.startswith("<bos><start_of_turn>user\n")
        assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
        assert prompt.count("<start_of_turn>") == 2, "one user turn, then the model's"
        assert "system" not in prompt.split("<start_of_turn>")[1][:10]
        assert STEP_FORMAT in prompt
        if name in ("math500", "omnimath", "aime"):
            assert MATH_SYSTEM in prompt  # the instruction is in the user turn
        if name.startswith("korbench"):
            assert example.meta["rule_content"].strip()[:200] in prompt


def test_gemma_tokenizer_built_offline_renders_the_same(hf_meta: Path, gemma_template, examples) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(hf_meta / "gemma-3-4b-it")
    assert detect_family(tok) == "gemma"
    for name, example in examples.items():
        assert render_prompt(tok, example, name) == render_prompt(gemma_template, example, name)


def test_per_benchmark_instructions(examples: dict) -> None:
    acp = build_messages(examples["acpbench"], "acpbench", "gemma")[-1]["content"]
    assert "letter" in acp and "\\boxed{" in acp
    musique = build_messages(examples["musique"], "musique", "qwen")[-1]["content"]
    assert "short answer" in musique
    for name in ("korbench_cipher", "korbench_counterfactual", "korbench_logic"):
        text = build_messages(examples[name], name, "qwen")[-1]["content"]
        assert examples[name].meta["rule_content"].strip() in text
        assert "[[" in text and text.rstrip().endswith("### Answer:")
    math = build_messages(examples["math500"], "math500", "qwen-math")
    assert [m["role"] for m in math] == ["system", "user"] and math[0]["content"] == MATH_SYSTEM
    broad = build_messages(examples["korbench_cipher"], "korbench_cipher", "qwen-math")
    assert "\\boxed" not in broad[0]["content"], "no \\boxed{} system prompt against [[...]] answers"
    assert all(m["role"] == "user" for m in build_messages(examples["aime"], "aime", "gemma"))
    with pytest.raises(ValueError, match="llama"):
        build_messages(examples["aime"], "aime", "llama")


def test_family_must_be_knowable() -> None:
    class Bare:
        chat_template = "{{ messages }}"
        name_or_path = "some/model"

        def apply_chat_template(self, conversation, **kwargs):  # pragma: no cover - never reached
            return ""

    with pytest.raises(ValueError, match="family"):
        detect_family(Bare())
