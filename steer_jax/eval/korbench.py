"""KOR-Bench grading for the three subsets STEER uses: cipher, counterfactual, logic.

A re-implementation of the rules of the official evaluation (KOR-Bench/KOR-Bench, eval/eval_utils.py
at bb8194d), written from reading it:

- The answer is the FIRST bracketed span of the output: "[[...]]", else "$\\boxed{...}$", else
  "[...]"; each span ends at the first closing delimiter after its opening one.
- cipher and counterfactual: drop double quotes, newlines, spaces and square brackets from the
  span; correct when "[[" + that + "]]" is the reference. Case matters.
- logic: drop double quotes, newlines, spaces and full stops from both the output's span and the
  reference's, then compare exactly; except rule 5 (truth tables), where both bracketed strings are
  split at ";" and compared as sorted lists, so the rows between the first and the last may come in
  any order (the first and last pieces keep the outer "[[" / "]]", as in the official code).
- counterfactual also reports whether the output picked the real-world answer (`real_life`).

The official code compares cipher/counterfactual spans with the raw reference; here the reference
is cleaned the same way, which changes nothing on the shipped data (no reference has a character
the cleaning drops; a test checks that) and keeps hand-written references from failing on a space.
Spans are found with str.find rather than the official lazy regexes, which take quadratic time on
outputs with many unclosed "[[".
"""

from __future__ import annotations

SUBSETS = ("cipher", "counterfactual", "logic")

_DROP_CLEAN = str.maketrans("", "", '"\n []')
_DROP_LOGIC = str.maketrans("", "", '"\n .')


def _span(text: str, opening: str, closing: str) -> str | None:
    start = text.find(opening)
    if start < 0:
        return None
    end = text.find(closing, start + len(opening))
    return None if end < 0 else text[start + len(opening) : end].strip()


def first_bracketed(text: str) -> str | None:
    """The contents of the first [[...]], else the first $\\boxed{...}$, else the first [...]."""
    for opening, closing in (("[[", "]]"), ("$\\boxed{", "}$"), ("[", "]")):
        found = _span(text, opening, closing)
        if found is not None:
            return found
    return None


def _clean(span: str, subset: str) -> str:
    return span.translate(_DROP_LOGIC if subset == "logic" else _DROP_CLEAN)


def extract_korbench_answer(output: str, subset: str) -> str:
    """The answer in the benchmark's own format, "[[...]]" after cleaning; "" when there is none."""
    span = first_bracketed(output)
    return "" if span is None else f"[[{_clean(span, subset)}]]"


def _reference(reference: str, subset: str) -> str:
    span = first_bracketed(reference)
    return f"[[{_clean(span if span is not None else reference, subset)}]]"


def korbench_equal(output: str, reference: str, subset: str, rule_id: str | None = None) -> bool:
    """Whether the output's answer matches `reference` under the subset's official rule."""
    if subset not in SUBSETS:
        raise ValueError(f"KOR-Bench subset {subset!r} is not one of {SUBSETS}")
    answer = extract_korbench_answer(output, subset)
    if not answer:
        return False
    gold = _reference(reference, subset)
    if subset == "logic" and str(rule_id) == "5":
        return sorted(answer.split(";")) == sorted(gold.split(";"))
    return answer == gold
