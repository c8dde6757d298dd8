"""Graders against the real reference answers, and against outputs built to break them."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from steer_jax.eval import Example, extract_answer, grade, load_benchmark, metrics
from steer_jax.eval.extraction import boxed_contents, last_boxed, last_number
from steer_jax.eval.math_grading import _canonical_string, _symbolic_equal, math_equal
from steer_jax.eval.qa_grading import normalize_answer, token_f1

OMNI_SAMPLE = 400


def _model_like(answer: str) -> str:
    # Steps separated by blank lines, an intermediate box, and the final box last.
    return (
        "Let us set up the problem.\n\n"
        "A first guess would be \\boxed{0} but that ignores the constraint.\n\n"
        f"Putting everything together, the answer is $\\boxed{{{answer}}}$."
    )


def _different(a: str, b: str) -> bool:
    """Answers that are not the same value spelled alike ("x=5" and "5" are the same)."""
    return _canonical_string(a.split("=")[-1]) != _canonical_string(b.split("=")[-1])


@pytest.fixture(scope="module")
def math500(shared_data: Path) -> list[Example]:
    return load_benchmark("math500", shared_data)


@pytest.fixture(scope="module")
def omni_sample(shared_data: Path) -> list[Example]:
    examples = load_benchmark("omnimath", shared_data)
    return random.Random(0).sample(examples, OMNI_SAMPLE)


@pytest.mark.parametrize("which", ["math500", "omni_sample"])
def test_own_answer_right_other_answer_wrong(request: pytest.FixtureRequest, which: str) -> None:
    examples: list[Example] = request.getfixturevalue(which)
    name = "math500" if which == "math500" else "omnimath"
    right = [grade(name, _model_like(e.reference), e) for e in examples]
    assert sum(right) / len(right) >= 0.99, [
        e.reference for e, ok in zip(examples, right, strict=True) if not ok
    ][:10]
    false_positives = []
    for i, e in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        if _different(e.reference, other.reference) and grade(name, _model_like(other.reference), e):
            false_positives.append((e.reference, other.reference))
    assert not false_positives


@pytest.mark.parametrize("which", ["math500", "omni_sample"])
def test_math_verify_itself_accepts_every_reference(request: pytest.FixtureRequest, which: str) -> None:
    # Past the string shortcut: the symbolic path must parse and accept each real answer too.
    examples: list[Example] = request.getfixturevalue(which)
    failed = [e.reference for e in examples if not _symbolic_equal(e.reference, e.reference, 3)]
    assert len(failed) <= 0.01 * len(examples), failed[:10]


@pytest.mark.parametrize(
    ("reference", "candidate", "equal"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\frac{1}{2}", "\\frac{1}{3}", False),
        ("10", "\\text{10 dollars}", False),
        ("x^2+2x+1", "(x+1)^2", True),
        ("5", "", False),
    ],
)
def test_math_equivalence(reference: str, candidate: str, equal: bool) -> None:
    assert math_equal(reference, candidate) is equal


def test_math_extraction_last_box_then_last_number() -> None:
    assert extract_answer("math500", "\\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert extract_answer("math500", "so x = 1,000 and finally 42.") == "42"
    assert extract_answer("math500", "no answer here") == ""
    assert last_boxed("\\boxed {7}") == "7"
    assert last_boxed("\\boxed 7.") == "7"
    assert boxed_contents("\\boxed{\\{1,2\\}} and \\fbox{3}") == ["\\{1,2\\}", "3"]
    assert last_boxed("cut off \\boxed{\\frac{1}{") is None
    assert last_number("between -3.5 and 1,234") == "1234"
    example = Example(id="t", question="q", reference="42")
    assert grade("math500", "The total is 40 + 2 = 42", example)
    assert not grade("math500", "The total is 42, I mean 43", example)


def test_aime_integers(shared_data: Path) -> None:
    examples = load_benchmark("aime", shared_data)
    padded = [e for e in examples if e.reference.startswith("0")]
    assert padded, "the shared AIME copy has zero-padded answers"
    for e in examples:
        value = int("".join(ch for ch in e.reference if ch.isdigit()))
        for output in (f"\\boxed{{{value}}}", f"\\boxed{{{value:03d}}}", f"so it is {value}."):
            assert grade("aime", output, e), (e.id, output)
        assert not grade("aime", f"\\boxed{{{value + 1}}}", e)
        assert extract_answer("aime", f"\\boxed{{{value:03d}}}") == str(value)
    degrees = next(e for e in examples if e.reference == "336^\\circ")
    assert grade("aime", "The angle is \\boxed{336^\\circ}", degrees)
    assert grade("aime", "\\boxed{m+n=336}", degrees)
    assert not grade("aime", "\\boxed{\\frac{336}{2}} and 336", degrees)


def test_acpbench_letters(shared_data: Path) -> None:
    examples = load_benchmark("acpbench", shared_data)
    letters = "ABCD"
    for e in examples[::37]:
        wrong = letters[(letters.index(e.reference) + 1) % 4]
        assert grade("acpbench", f"Step one.\n\nStep two.\n\n\\boxed{{{e.reference}}}", e)
        assert grade("acpbench", f"Options {wrong} and A look close.\n\nThe answer is {e.reference}.", e)
        assert grade("acpbench", f"Answer: ({e.reference})", e)
        assert not grade("acpbench", f"\\boxed{{{wrong}}}", e)
        text = e.meta["choices"]["text"][letters.index(e.reference)]
        assert grade("acpbench", f"\\boxed{{{text}}}", e)
    assert extract_answer("acpbench", "**Answer:** **C**") == "C"
    assert extract_answer("acpbench", "\\boxed{\\text{(B)}}") == "B"
    assert extract_answer("acpbench", "A plan is a sequence of actions.") == ""
    assert extract_answer("acpbench", "I think B.\n\nFinal answer: D") == "D"
    assert extract_answer("acpbench", "It is\n\nB") == "B"
    assert extract_answer("acpbench", "\\boxed{C. travel by sea}") == "C"
    assert extract_answer("acpbench", "\\boxed{A travel by sea}") == ""


def test_musique_normalization_and_f1(shared_data: Path) -> None:
    assert normalize_answer("The  Beatles!") == "beatles"
    assert normalize_answer("An Apple, a day") == "apple day"
    assert token_f1("Time Warner Cable Inc.", "Time Warner Cable") == pytest.approx(2 * 0.75 * 1 / 1.75)
    examples = load_benchmark("musique", shared_data, limit=200)
    for i, e in enumerate(examples):
        shouted = f"\\boxed{{THE {e.reference.upper()}.}}"
        assert grade("musique", shouted, e)
        assert grade("musique", f"First fact.\n\nSecond fact.\n\nThe answer is {e.reference}.", e)
        other = examples[(i + 1) % len(examples)]
        if normalize_answer(other.reference) != normalize_answer(e.reference):
            assert not grade("musique", f"\\boxed{{{other.reference}}}", e)
    e = examples[4]  # "Bombardier Inc."
    scores = metrics("musique", "\\boxed{Bombardier}", e)
    assert scores["correct"] == 0.0 and scores["f1"] == pytest.approx(2 / 3)
    aliased = Example(id="a", question="q", reference="United States", meta={"answer_aliases": ["USA"]})
    assert grade("musique", "\\boxed{USA}", aliased)


@pytest.mark.parametrize("subset", ["cipher", "counterfactual", "logic"])
def test_korbench_real_answers_in_its_format(shared_data: Path, subset: str) -> None:
    name = f"korbench_{subset}"
    examples = load_benchmark(name, shared_data)
    for i, e in enumerate(examples):
        output = f"Apply the rule.\n\nWork through it.\n\nSo the answer is {e.reference}"
        assert grade(name, output, e), (e.id, e.reference)
        assert extract_answer(name, output) == extract_answer(name, e.reference)
        other = examples[(i + 1) % len(examples)]
        if other.reference != e.reference:
            assert not grade(name, f"So the answer is {other.reference}", e), (e.id, other.reference)
    assert not grade(name, "I cannot tell.", examples[0])


def test_korbench_official_rules(shared_data: Path) -> None:
    cipher = load_benchmark("korbench_cipher", shared_data)[0]  # [[N]]
    assert grade("korbench_cipher", 'The ciphertext is [[ "N" ]].', cipher)
    assert not grade("korbench_cipher", "[[n]]", cipher)  # case matters
    # The first bracketed span counts, as in the official evaluation.
    assert not grade("korbench_cipher", "Format: [[X]]. Result: [[N]]", cipher)
    assert grade("korbench_cipher", "$\\boxed{N}$", cipher)

    logic = load_benchmark("korbench_logic", shared_data)
    sentence = next(e for e in logic if e.reference == "[[Someproductsarenon-top-grade.]]")
    assert grade("korbench_logic", "[[Some products are non-top-grade.]]", sentence)
    assert not grade("korbench_logic", "[[Some products are top-grade.]]", sentence)
    table = next(e for e in logic if e.meta["rule_id"] == "5" and e.reference.count(";") >= 4)
    rows = table.reference[2:-2].split(";")
    middle_swapped = [rows[0], rows[2], rows[1], *rows[3:]]
    assert grade("korbench_logic", "[[" + ";".join(middle_swapped) + "]]", table)
    assert not grade("korbench_logic", "[[" + ";".join(rows[:-1]) + "]]", table)

    counterfactual = load_benchmark("korbench_counterfactual", shared_data)
    e = next(x for x in counterfactual if x.meta["real_life_answer"] != x.reference)
    story = metrics("korbench_counterfactual", f"In the story, {e.reference}", e)
    real = metrics("korbench_counterfactual", f"In reality, {e.meta['real_life_answer']}", e)
    assert (story["correct"], story["real_life"]) == (1.0, 0.0)
    assert (real["correct"], real["real_life"]) == (0.0, 1.0)


def test_korbench_references_survive_cleaning(shared_data: Path) -> None:
    # Cleaning the reference as well as the output is faithful only while no reference holds a
    # character the official cleaning drops.
    for subset in ("cipher", "counterfactual"):
        for e in load_benchmark(f"korbench_{subset}", shared_data):
            inner = e.reference[2:-2]
            assert not set(inner) & set('"\n []'), e.id


def test_pathological_outputs_finish_quickly() -> None:
    example = Example(id="p", question="q", reference="7")
    outputs = [
        "\\boxed{9^{9^{9^{9^{9}}}}}",
        "\\boxed{(10^{10})!}",
        "1 " * 200_000,
        "\\boxed{" + "{" * 20_000,
        "\\boxed{1} " * 20_000,
        "[[" * 50_000,
        "answer is " * 20_000,
        ("The answer" + " " * 20_000 + "\n") * 20,  # blank runs defeat regexes with stacked \s*
        "answer" + "\n" * 50_000,
    ]
    for output in outputs:
        start = time.monotonic()
        for name in ("math500", "aime", "acpbench", "musique", "korbench_cipher"):
            ex = Example(id="p", question="q", reference="[[7]]") if name.startswith("kor") else example
            assert grade(name, output, ex) is False
        assert time.monotonic() - start < 12, output[:40]


def test_grading_off_the_main_thread() -> None:
    # No SIGALRM there: the symbolic check runs in a child process that is killed on overrun.
    results: dict[str, object] = {}

    def work() -> None:
        start = time.monotonic()
        results["right"] = grade(
            "math500", "\\boxed{0.5}", Example(id="a", question="q", reference="\\frac12")
        )
        results["tower"] = grade(
            "math500", "\\boxed{9^{9^{9^{9^{9}}}}}", Example(id="b", question="q", reference="7")
        )
        results["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert results["right"] is True and results["tower"] is False
    assert results["seconds"] < 60
