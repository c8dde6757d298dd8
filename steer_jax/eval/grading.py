"""One entry point per question for the whole suite: extract_answer, grade and metrics by benchmark."""

from __future__ import annotations

from steer_jax.eval.benchmarks import BENCHMARKS, DEMO, canonical_name
from steer_jax.eval.example import Example
from steer_jax.eval.demo_task import demo_equal, extract_demo_answer
from steer_jax.eval.extraction import last_boxed
from steer_jax.eval.korbench import extract_korbench_answer, korbench_equal
from steer_jax.eval.math_grading import extract_aime_answer, extract_math_answer, grade_aime, math_equal
from steer_jax.eval.qa_grading import (
    extract_option_letter,
    extract_short_answer,
    musique_scores,
    option_from_text,
)

__all__ = ["BENCHMARKS", "extract_answer", "grade", "metrics"]


def extract_answer(name: str, output: str) -> str:
    """The answer an output commits to, as it goes into a trace's `answer` field ("" if none)."""
    key = canonical_name(name)
    if key == DEMO:
        return extract_demo_answer(output)
    if key == "aime":
        return extract_aime_answer(output)
    if key in ("math500", "omnimath"):
        return extract_math_answer(output)
    if key == "acpbench":
        return extract_option_letter(output)
    if key == "musique":
        return extract_short_answer(output)
    return extract_korbench_answer(output, key.removeprefix("korbench_"))


def grade(name: str, output: str, example: Example) -> bool:
    """Whether `output` answers `example` correctly, by the benchmark's own rule."""
    return bool(metrics(name, output, example)["correct"])


def metrics(name: str, output: str, example: Example) -> dict[str, float]:
    """`correct` (0/1) plus the benchmark's extra measures: MuSiQue `f1`, counterfactual `real_life`."""
    key = canonical_name(name)
    if key == DEMO:
        return {"correct": float(demo_equal(output, example.reference))}
    if key == "aime":
        return {"correct": float(grade_aime(output, example.reference))}
    if key in ("math500", "omnimath"):
        return {"correct": float(math_equal(example.reference, extract_math_answer(output)))}
    if key == "acpbench":
        letter = extract_option_letter(output)
        boxed = last_boxed(output)
        if not letter and boxed is not None and "choices" in example.meta:
            choices = example.meta["choices"]
            letter = option_from_text(boxed, choices["label"], choices["text"])
        return {"correct": float(letter == example.reference.strip().upper())}
    if key == "musique":
        golds = [example.reference, *example.meta.get("answer_aliases", [])]
        scores = musique_scores(output, golds)
        return {"correct": scores["em"], "f1": scores["f1"]}
    subset = key.removeprefix("korbench_")
    rule_id = example.meta.get("rule_id")
    out = {"correct": float(korbench_equal(output, example.reference, subset, rule_id))}
    if subset == "counterfactual" and example.meta.get("real_life_answer"):
        real = example.meta["real_life_answer"]
        out["real_life"] = float(korbench_equal(output, real, subset, rule_id))
    return out
