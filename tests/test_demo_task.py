"""The demo benchmark: arithmetic recomputed independently, splits, grading, and the tokenizer the
demo models load through AutoTokenizer like real checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from steer_jax.eval import detect_family, extract_answer, grade, load_benchmark, render_prompt
from steer_jax.eval.demo_task import (
    INSTRUCTION,
    LEVELS,
    MAX_STEPS,
    MIN_STEPS,
    TEST_SIZE,
    make_split,
    rule_of,
    save_demo_tokenizer,
    write_split,
)

transformers = pytest.importorskip("transformers")

QUESTION = re.compile(
    r"Start with (\d)\. Repeat (\d) times: x((?: [-+*] \d)+)\. Keep the last digit\. What is the result\?")
OPERATION = re.compile(r" ([-+*]) (\d)")
# A step: the start value, then each operation of the rule with its intermediate result.
STEP = re.compile(r"(\d)((?: [-+*] \d = \d)+)")
LINK = re.compile(r" ([-+*]) (\d) = (\d)")


@pytest.fixture(scope="module")
def test_split() -> list:
    return make_split("test")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = save_demo_tokenizer(tmp_path_factory.mktemp("demo") / "tokenizer")
    return transformers.AutoTokenizer.from_pretrained(path)


def _last_digit(value: int, operations: list[tuple[str, str]]) -> int:
    """Left to right in unbounded integers, the last digit taken once at the end: independent of
    the generator, which reduces after every operation."""
    for op, operand in operations:
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op]
    return value % 10


def test_worked_steps_recompute_from_the_question(test_split: list) -> None:
    for e in test_split:
        m = QUESTION.fullmatch(e.question)
        assert m, e.question
        value, repeats, rule = int(m.group(1)), int(m.group(2)), m.group(3)
        operations = OPERATION.findall(rule)
        *steps, answer_line = e.meta["solution"].split("\n\n")
        assert MIN_STEPS <= e.meta["steps"] == repeats == len(steps) <= MAX_STEPS
        assert LEVELS[e.meta["level"]].ops == len(operations)  # the level is the rule's length
        assert all(op != "*" or int(x) >= 2 for op, x in operations)
        assert rule_of(e.question) == [(op, int(x)) for op, x in operations]
        for step in steps:
            s = STEP.fullmatch(step)
            assert s, repr(step)  # also rules out stray newlines inside a step
            assert int(s.group(1)) == value
            links = LINK.findall(s.group(2))
            assert [(op, x) for op, x, _ in links] == operations  # the rule, in order
            for i, (_, _, result) in enumerate(links):  # each result from the step's start
                assert int(result) == _last_digit(value, operations[: i + 1])
            value = _last_digit(value, operations)
        assert answer_line == f"Answer: {value}" and e.reference == str(value)


def test_rule_of_refuses_other_text() -> None:
    with pytest.raises(ValueError, match="not a demo question"):
        rule_of("What is 2 + 2?")


def test_worked_solution_is_right_and_a_changed_answer_wrong(test_split: list) -> None:
    for e in test_split:
        solution = e.meta["solution"]
        assert grade("demo", solution, e)
        assert extract_answer("demo", solution) == e.reference
        wrong = solution.rsplit("Answer:", 1)[0] + f"Answer: {int(e.reference) + 1}"
        assert not grade("demo", wrong, e)


def test_grader_reads_the_last_answer_line_only() -> None:
    e = make_split("test", 1)[0]
    ref = e.reference
    assert grade("demo", f"1 + 1 = 2\n\nAnswer:   {ref}  \n", e)
    assert grade("demo", f"Answer: {int(ref) + 1}\n\nAnswer: {ref}", e)
    assert not grade("demo", f"Answer: {ref}\n\nAnswer: {int(ref) + 1}", e)
    assert not grade("demo", f"Answer: {ref}\n\nAnswer: none", e)  # the last word is no integer
    assert not grade("demo", f"the result is {ref}", e)
    assert not grade("demo", "", e)
    assert extract_answer("demo", "Answer: 007") == "7"


def test_splits_are_deterministic_distinct_and_disjoint(test_split: list) -> None:
    assert len(test_split) == TEST_SIZE >= 300
    assert make_split("test") == test_split
    train = make_split("train", 3000)
    assert make_split("train", 3000) == train
    assert make_split("train", 3000, seed=2) != train
    for split in (test_split, train):
        assert len({e.question for e in split}) == len(split)
        assert len({e.id for e in split}) == len(split)
    # Disjoint by construction, so also for sizes and seeds other than the shipped ones.
    other_test = make_split("test", 300, seed=7)
    assert {e.question for e in train}.isdisjoint({e.question for e in test_split + other_test})


def test_levels_and_step_counts_vary_independently(test_split: list) -> None:
    counts: dict[tuple[int, int], int] = {}
    for e in test_split:
        key = (e.meta["level"], e.meta["steps"])
        counts[key] = counts.get(key, 0) + 1
    assert {level for level, _ in counts} == set(LEVELS)
    assert all(sum(n for (lv, _), n in counts.items() if lv == level) >= TEST_SIZE // 10
               for level in LEVELS)
    # Every level comes in every length: length says nothing of difficulty.
    assert {(lv, st) for lv in LEVELS for st in range(MIN_STEPS, MAX_STEPS + 1)} <= set(counts)


def test_tokenizer_files_and_special_tokens(tokenizer, tmp_path: Path) -> None:
    path = save_demo_tokenizer(tmp_path / "tok")
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert (path / "tokenizer.json").is_file() and "<|im_start|>" in config["chat_template"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    assert len(tokenizer) < 200
    # Ids are 0..len-1 with no hole: a model's embedding table has len(tokenizer) rows.
    assert sorted(tokenizer.get_vocab().values()) == list(range(len(tokenizer)))


def test_blank_line_digits_and_words_are_single_tokens(tokenizer) -> None:
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    (blank,) = ids("\n\n")
    assert tokenizer.decode([blank]) == "\n\n"
    assert len(ids("\n")) == 1 and len(ids("\n\n\n")) == 2
    assert ids("90817") == [ids(d)[0] for d in "90817"]
    tokens = tokenizer.convert_ids_to_tokens(ids("Start with 4. Repeat 3 times: x * 6."))
    assert tokens == ["Start", " with", " ", "4", ".", " Repeat", " ", "3", " times", ":", " ", "x",
                      " * ", "6", "."]
    assert tokenizer.convert_ids_to_tokens(ids("12 * 3 = 36")) == ["1", "2", " * ", "3", " = ", "3", "6"]
    assert tokenizer.convert_ids_to_tokens(ids("Adds")) == ["A", "d", "d", "s"]  # words are whole
    assert tokenizer.unk_token_id in ids("é")  # foreign text encodes, lossily, rather than failing


def test_tokenizer_round_trip_and_lengths(tokenizer, test_split: list) -> None:
    (blank,) = tokenizer.encode("\n\n", add_special_tokens=False)
    for e in test_split:
        prompt = render_prompt(tokenizer, e, "demo")
        solution = e.meta["solution"]
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        solution_ids = tokenizer.encode(solution, add_special_tokens=False)
        assert tokenizer.decode(prompt_ids) == prompt
        assert tokenizer.decode(solution_ids) == solution
        # One delimiter token per step: a step ends on a single token.
        assert solution_ids.count(blank) == e.meta["steps"]
        # Short enough for tiny models trained on a laptop CPU.
        assert len(prompt_ids) < 80 and len(solution_ids) < 120


def test_prompt_renders_through_the_chat_template(tokenizer, test_split: list) -> None:
    e = test_split[0]
    assert detect_family(tokenizer) == "qwen"
    prompt = render_prompt(tokenizer, e, "demo")
    assert prompt == f"<|im_start|>user\n{e.question}\n\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"


def test_load_benchmark_without_and_with_a_path(test_split: list, tmp_path: Path) -> None:
    examples = load_benchmark("demo", limit=5)
    assert examples == test_split[:5]
    for e in examples:
        assert e.id.startswith("demo/test/") and e.reference == str(int(e.reference))
        assert set(e.meta) == {"level", "steps", "solution"} and e.meta["level"] in LEVELS
    stored = write_split(tmp_path / "demo" / "test.jsonl", test_split[:20])
    for path in (tmp_path, tmp_path / "demo", stored):
        assert load_benchmark("demo", path) == test_split[:20]
    with pytest.raises(FileNotFoundError):
        load_benchmark("demo", tmp_path / "absent")
