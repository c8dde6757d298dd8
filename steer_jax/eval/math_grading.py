"""Math answers (MATH500, Omni-MATH, AIME): extraction and equivalence.

Equivalence is math-verify's (sympy-backed, tolerant of LaTeX spellings). math-verify bounds its
parse and verify calls with SIGALRM, which exists only in the main thread. Graders called from any
other thread (a thread pool, an async server) hand the symbolic check to a child process instead,
whose main thread has SIGALRM, and kill it if it still overruns; so no output can hang grading.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from pathlib import Path

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from steer_jax.eval.extraction import last_boxed, last_number, strip_latex_text

# Seconds per math-verify call (a parse or a verify). Real answers take milliseconds; degenerate
# ones (power towers, huge factorials) would otherwise run for minutes.
TIMEOUT_S = 3
# Longer candidates are not final answers but a box swallowing a derivation; sympy on them is
# where the time goes, and they only ever equal the reference as strings.
MAX_SYMBOLIC_CHARS = 400
# A child process needs a few seconds to import sympy before its first answer.
_CHILD_START_S = 120

_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _parse_boxed(answer: str, timeout_s: int | None) -> list:
    # Wrapping in \boxed{} makes math-verify take the whole string as one answer rather than
    # whichever sub-expression it would find first.
    return parse("\\boxed{" + answer + "}", extraction_config=_CONFIG, parsing_timeout=timeout_s)


def _symbolic_equal(reference: str, candidate: str, timeout_s: int | None) -> bool:
    gold = _parse_boxed(reference, timeout_s)
    pred = _parse_boxed(candidate, timeout_s)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout_s))


class _IsolatedVerifier:
    """math-verify in a child interpreter.

    A fresh interpreter rather than multiprocessing: fork is unsafe once JAX has started threads,
    and spawn re-imports the caller's __main__, which breaks scripts without a main guard.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None

    def _readline(self, timeout_s: float) -> str | None:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        return self._proc.stdout.readline() if ready else None

    def _start(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "steer_jax.eval.verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        if (self._readline(_CHILD_START_S) or "").strip() != "ready":
            self._stop()
            raise RuntimeError("the math-verify child process did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def equal(self, reference: str, candidate: str) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps([reference, candidate]) + "\n")
            self._proc.stdin.flush()
            # Three timed calls in the child plus slack: past that the child is stuck.
            line = self._readline(3 * TIMEOUT_S + 2)
            if line:
                return bool(json.loads(line))
            self._stop()
            return False

    def close(self) -> None:
        """Let the child finish on end of input (it exits by itself); kill it if it lingers."""
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            self._stop()


_ISOLATED = _IsolatedVerifier()
atexit.register(_ISOLATED.close)


def _canonical_string(s: str) -> str:
    s = strip_latex_text(s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    # Case does not matter in words ("Yes", "yes") but does in LaTeX (\Pi is not \pi).
    return s if "\\" in s else s.lower()


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
    if threading.current_thread() is threading.main_thread():
        return _symbolic_equal(reference, candidate, TIMEOUT_S)
    return _ISOLATED.equal(reference, candidate)


def grade_math(output: str, reference: str) -> bool:
    return math_equal(reference, extract_math_answer(output))


def aime_integer(text: str) -> int | None:
    """An AIME answer as an integer: "073" -> 73, "336^\\circ" -> 336; None if it is not one."""
    s = _canonical_string(text).replace("{", "").replace("}", "").replace(",", "")
    if not re.fullmatch(r"[+-]?\d+(?:\.0+)?", s):
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
