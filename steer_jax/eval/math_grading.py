"""Math answers (MATH500, Omni-MATH, AIME): extraction and equivalence.

Equivalence is math-verify's (sympy-backed, tolerant of LaTeX spellings). math-verify bounds its
parse and verify calls with SIGALRM, which only exists in the main thread; off the main thread the
timeouts are switched off (math-verify would otherwise fail every call there) and the length caps
below are what keeps a pathological output from hanging the grader.
"""

from __future__ import annotations

import logging
import re
import threading

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from steer_jax.eval.extraction import last_boxed, last_number, strip_latex_text

logger = logging.getLogger(__name__)

# Seconds per math-verify call. Generous for real answers (they take milliseconds), short enough
# that a run of degenerate outputs cannot stall an evaluation.
TIMEOUT_S = 3
# Longer candidates are not real final answers (a box swallowing a whole derivation); sympy on
# them is where the time goes, so they are compared as strings only.
MAX_SYMBOLIC_CHARS = 400

_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse_boxed(answer: str) -> list:
    # Wrapping in \boxed{} makes math-verify take the whole string as one answer, not some
    # sub-expression it finds first.
    return parse(
        "\\boxed{" + answer + "}",
        extraction_config=_CONFIG,
        parsing_timeout=_timeout(),
    )


def _canonical_string(s: str) -> str:
    s = strip_latex_text(s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".").lower()


def extract_math_answer(output: str) -> str:
    """The last \\boxed{} of the output, else its last number, else ""."""
    boxed = last_boxed(output)
    if boxed is not None:
        return boxed
    number = last_number(output)
    return number if number is not None else ""


def math_equal(reference: str, candidate: str) -> bool:
    """Whether candidate (an extracted answer) is mathematically the reference."""
    if not candidate.strip():
        return False
    if _canonical_string(reference) == _canonical_string(candidate):
        return True
    if len(candidate) > MAX_SYMBOLIC_CHARS:
        return False
    gold = _parse_boxed(reference)
    pred = _parse_boxed(candidate)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_timeout()))


def grade_math(output: str, reference: str) -> bool:
    return math_equal(reference, extract_math_answer(output))


def aime_integer(text: str) -> int | None:
    """An AIME answer as an integer: "073" -> 73, "336^\\circ" -> 336; None if it is not one."""
    s = _canonical_string(text)
    s = s.replace("{", "").replace("}", "").replace(",", "")
    m = re.fullmatch(r"[+-]?\d+(?:\.0+)?", s)
    if not m:
        return None
    return int(float(s))


def extract_aime_answer(output: str) -> str:
    """The committed integer as a string ("" when there is none).

    The last box decides when there is one ("m+n=106" counts as its right-hand side); a box holding
    a non-integer is a wrong commitment, not an invitation to look for some other number.
    """
    boxed = last_boxed(output)
    candidate = boxed.rsplit("=", 1)[-1] if boxed is not None else (last_number(output) or "")
    value = aime_integer(candidate)
    return "" if value is None else str(value)


def grade_aime(output: str, reference: str) -> bool:
    gold = aime_integer(reference)
    if gold is None:
        raise ValueError(f"AIME reference {reference!r} is not an integer")
    pred = extract_aime_answer(output)
    return pred != "" and int(pred) == gold
