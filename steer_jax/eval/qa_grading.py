"""Short-answer and multiple-choice grading: MuSiQue (exact match, token F1) and ACPBench (letters).

MuSiQue scoring follows the standard SQuAD-style normalization its official evaluation uses:
lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace; a prediction is
right when it equals the answer or one of its aliases, and F1 is the best token overlap with them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from steer_jax.eval.extraction import last_boxed, strip_latex_text

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# "The answer is: X", "Final answer: X", "**Answer:** X" up to the end of the line. The last one
# wins: models restate the question's options or earlier guesses before committing. One character
# class between "answer" and the captured text, never two adjacent quantifiers that could both take
# the same characters: that is what keeps these linear on long runs of blanks.
_ANSWER_PHRASE = re.compile(r"\banswer\b(?:[ \t]+is)?[ \t:：*]*([^\s][^\n]*)", re.IGNORECASE)


def normalize_answer(s: str) -> str:
    s = s.lower().translate(_PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def extract_short_answer(output: str) -> str:
    """The last \\boxed{}, else the text after the last "answer is"/"Answer:", else the last line."""
    boxed = last_boxed(output)
    if boxed is not None:
        found = boxed
    else:
        phrases = _ANSWER_PHRASE.findall(output)
        if phrases:
            found = phrases[-1]
        else:
            lines = [line for line in output.splitlines() if line.strip()]
            found = lines[-1] if lines else ""
    found = strip_latex_text(found).strip().strip("*").strip()
    return found.rstrip(".").strip()


def musique_scores(output: str, golds: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1 of the extracted answer, maximized over the gold answers."""
    prediction = extract_short_answer(output)
    if not prediction:
        return {"em": 0.0, "f1": 0.0}
    em = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    f1 = max(token_f1(prediction, g) for g in golds)
    return {"em": em, "f1": f1}


# A letter standing alone: "B", "(B)", "B.", "B)", "**B**", "Option B", or "B. <option text>".
_LONE_LETTER = re.compile(r"(?:option\s*)?\(?([A-D])\)?(?:[.):](?:\s.*)?)?", re.IGNORECASE | re.DOTALL)
_LETTER_PHRASE = re.compile(
    r"\banswer\b(?:[ \t]+is)?[ \t:：*]*(?:option[ \t]*)?\(?([A-D])\b(?![-'])", re.IGNORECASE
)


def _lone_letter(text: str) -> str | None:
    s = strip_latex_text(text).strip().strip("*").strip()
    m = _LONE_LETTER.fullmatch(s)
    # Lower-case "a" is usually the article; accept lower case only as the whole text.
    if m and (m.group(1).isupper() or len(s) == 1):
        return m.group(1).upper()
    return None


def extract_option_letter(output: str) -> str:
    """The option letter the output commits to ("" when it commits to none).

    Order: the last box; then the last "answer is X" / "Answer: X"; then a final line that is only
    a letter. A box that holds something other than a letter is a commitment too, just not to a
    letter, so nothing later overrides it.
    """
    boxed = last_boxed(output)
    if boxed is not None:
        return _lone_letter(boxed) or ""
    phrases = [m.group(1) for m in _LETTER_PHRASE.finditer(output)]
    phrases = [p for p in phrases if p.isupper()]
    if phrases:
        return phrases[-1]
    lines = [line for line in output.splitlines() if line.strip()]
    return (_lone_letter(lines[-1]) or "") if lines else ""


def option_from_text(boxed: str, labels: Sequence[str], texts: Sequence[str]) -> str:
    """The label whose option text the box spells out, for models that box the text itself."""
    wanted = normalize_answer(strip_latex_text(boxed))
    for label, text in zip(labels, texts, strict=True):
        if wanted and normalize_answer(text) == wanted:
            return label
    return ""
