"""`demo`: a synthetic multi-step arithmetic benchmark and its tokenizer, for the embedded demo.

The demo trains a tiny small/large model pair on a laptop CPU within an hour, so it needs a task
tiny models can learn that fast, whose steps are delimited exactly as STEER expects, and whose
difficulty behaves as in real reasoning: it differs between problems and persists within one.
A rule applied again and again, on the last digit, does that:

    question  Start with 3. Repeat 3 times: x * 7 + 4. Keep the last digit. What is the result?
    solution  3 * 7 = 1 + 4 = 5\n\n5 * 7 = 5 + 4 = 9\n\n9 * 7 = 3 + 4 = 7\n\nAnswer: 7

One application of the rule per step, each operation with its own intermediate result, steps
separated by a blank line ("\n\n"), a final "Answer: N" line graded by exact integer match.
Operations run left to right and only the last digit is kept. Every number is one digit, one
token, so each result token is one table lookup; what grows with a problem's level (`LEVELS`: the
number of operations in its rule) is the bookkeeping (which operand of the rule comes next) and
the number of facts a step needs. Because every step applies the same rule, a model that lacks a
fact the rule needs (the demo's small model never learns multiplication by 6-9, see
`train_demo`) is unsure on every step of that problem and sure on every step of the others:
difficulty differs between problems and persists within one, which is what makes a step's
confidence a signal for routing the next. (An earlier version wrote one result per line, which
asked for four lookups composed inside one token: even the large model did not learn that.)
Levels (1..4) and step counts (2..6) are drawn independently, so a problem's length says nothing
of its difficulty. `rule_of` reads a question's rule back.

Splits: `make_split(split, n, seed)` is a pure function of its arguments. A problem belongs to the
test split iff a stable hash of its question text falls in one of `_TEST_BUCKETS` of `_BUCKETS`
buckets, so train and test are disjoint for every size and seed, not just the shipped ones. The
fixed test split (`TEST_SIZE` problems from `TEST_SEED`) is what `load_benchmark("demo")` returns;
`write_split` stores a split as JSONL that `load_benchmark("demo", path)` reads back.

Tokenizer: `build_demo_tokenizer` makes a word-level tokenizer with `tokenizers` and wraps it as a
transformers fast tokenizer with a ChatML template, so the demo loads through `AutoTokenizer` like
real checkpoints do and `detect_family` sees the "qwen" family. Digits are single tokens;
" + ", " - ", " * ", " = " are one token each; the task's words are whole tokens, with and without
a leading space; "\n\n" is ONE token, so a step ends on a single token. Every other printable ASCII
character is a token of its own, so any ASCII text round-trips exactly; anything else encodes to
<|unk|> rather than failing. Keep the folder a saved tokenizer lives in free of "math" in its name:
`detect_family` would read it as Qwen-Math.
"""

from __future__ import annotations

import hashlib
import json
import operator
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from steer_jax.eval.example import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPLITS = ("train", "test")
TEST_SIZE = 500
TEST_SEED = 0
TRAIN_SIZE = 20_000
TRAIN_SEED = 1
MIN_STEPS, MAX_STEPS = 2, 6

INSTRUCTION = "Solve step by step, with a blank line between steps. End with Answer: N"
ANSWER_PREFIX = "Answer:"


@dataclass(frozen=True)
class Level:
    """How many operations the problem's rule applies in each step, and which ones it may use."""

    ops: int
    kinds: tuple[str, ...] = ("+", "-", "*")


LEVELS: dict[int, Level] = {k: Level(ops=k) for k in (1, 2, 3, 4)}
MODULUS = 10  # "keep the last digit"

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# Multiplying by 0 or 1 would make a step trivial.
_OPERANDS = {"+": (1, 9), "-": (1, 9), "*": (2, 9)}
# 1 in 5 question hashes belongs to the test split; train gets the other 4.
_BUCKETS, _TEST_BUCKETS = 5, 1


def apply_rule(value: int, rule: list[tuple[str, int]]) -> int:
    """The rule's operations on `value`, left to right, keeping the last digit."""
    for op, operand in rule:
        value = _OPS[op](value, operand) % MODULUS
    return value


_RULE = re.compile(r" ([-+*]) (\d)")


def rule_of(question: str) -> list[tuple[str, int]]:
    """The rule a demo question states, as (operator, operand) pairs in order."""
    head, sep, rest = question.partition(": x")
    if not sep:
        raise ValueError(f"not a demo question: {question!r}")
    return [(op, int(d)) for op, d in _RULE.findall(rest.split(".", 1)[0])]


def _problem(rng: random.Random, level_id: int, steps: int) -> tuple[str, str, int]:
    """(question, worked solution, answer) of one problem drawn from `rng`."""
    level = LEVELS[level_id]
    rule = []
    for _ in range(level.ops):
        op = rng.choice(level.kinds)
        rule.append((op, rng.randint(*_OPERANDS[op])))
    text = "".join(f" {op} {operand}" for op, operand in rule)
    value = rng.randint(0, MODULUS - 1)
    question = (f"Start with {value}. Repeat {steps} times: x{text}. Keep the last digit. "
                "What is the result?")
    lines = []
    for _ in range(steps):
        line = str(value)
        for op, operand in rule:
            value = apply_rule(value, [(op, operand)])
            line += f" {op} {operand} = {value}"
        lines.append(line)
    solution = "\n\n".join([*lines, f"{ANSWER_PREFIX} {value}"])
    return question, solution, value


def _is_test(question: str) -> bool:
    # sha256, not hash(): Python salts str hashes per process, and the split must not move.
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS < _TEST_BUCKETS


def make_split(split: str, n: int | None = None, seed: int | None = None) -> list[Example]:
    """`n` distinct problems of `split`, the same ones for the same arguments on any machine.

    Defaults: the fixed test split (TEST_SIZE from TEST_SEED) or the training set the demo models
    learn from (TRAIN_SIZE from TRAIN_SEED). Train and test never share a question.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    n = (TEST_SIZE if split == "test" else TRAIN_SIZE) if n is None else n
    seed = (TEST_SEED if split == "test" else TRAIN_SEED) if seed is None else seed
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A string seed is hashed with sha512 by `random`, so the stream is stable across processes.
    rng = random.Random(f"steer-jax/demo/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        level, steps = rng.randint(1, len(LEVELS)), rng.randint(MIN_STEPS, MAX_STEPS)
        question, solution, answer = _problem(rng, level, steps)
        if question in seen or _is_test(question) != (split == "test"):
            continue
        seen.add(question)
        out.append(
            Example(
                id=f"demo/{split}/{len(out)}",
                question=question,
                reference=str(answer),
                meta={"level": level, "steps": steps, "solution": solution},
            )
        )
    return out


def write_split(path: str | Path, split: list[Example]) -> Path:
    """Store `split` as JSONL (id, question, answer, level, steps, solution), one problem a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for e in split:
            record = {"id": e.id, "question": e.question, "answer": e.reference, **e.meta}
            f.write(json.dumps(record) + "\n")
    return path


def read_split(path: str | Path) -> list[Example]:
    """The examples `write_split` stored in `path`, in file order."""
    with Path(path).open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [
        Example(
            id=r["id"],
            question=r["question"],
            reference=str(r["answer"]),
            meta={"level": int(r["level"]), "steps": int(r["steps"]), "solution": r["solution"]},
        )
        for r in records
    ]


# ---- grading ------------------------------------------------------------------------------------

_ANSWER_LINE = re.compile(rf"^[ \t]*{ANSWER_PREFIX}(.*)$", re.MULTILINE)
_INTEGER = re.compile(r"[ \t]*(-?\d+)[ \t]*")


def extract_demo_answer(output: str) -> str:
    """The integer on the last "Answer:" line, canonical (no spaces, no leading zeros); "" if none.

    Only the last such line counts: a model that corrects itself is graded on its final word, and
    one whose final line is not an integer has committed to no answer.
    """
    lines = _ANSWER_LINE.findall(output)
    if not lines:
        return ""
    m = _INTEGER.fullmatch(lines[-1])
    return str(int(m.group(1))) if m else ""


def demo_equal(output: str, reference: str) -> bool:
    """Exact integer match of the output's final answer with the reference."""
    answer = extract_demo_answer(output)
    return bool(answer) and int(answer) == int(reference)


# ---- tokenizer ----------------------------------------------------------------------------------

PAD, BOS_TURN, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = (PAD, BOS_TURN, EOS, UNK)
OPERATORS = tuple(f" {op} " for op in (*_OPS, "="))
ROLES = ("system", "user", "assistant")
# ChatML, as Qwen2.5 writes it but without a default system turn: the demo's prompts stay short.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _words() -> list[str]:
    """Every word the questions, solutions, instruction and chat roles use, each once, sorted."""
    texts = ["Start with", "Repeat times", "Keep the last digit", "What is the result?",
             INSTRUCTION, ANSWER_PREFIX, *ROLES]
    return sorted({w for text in texts for w in re.findall(r"[A-Za-z]+", text)})


def _vocabulary() -> list[str]:
    """Token strings in id order: specials first, so their ids stay put if the words change."""
    chars = [chr(c) for c in range(32, 127)]
    words = _words()
    tokens = [*SPECIAL_TOKENS, "\n\n", "\n", *OPERATORS, *chars, *words, *(f" {w}" for w in words)]
    # One-letter words ("a", "N") are characters already; a repeat would leave a hole in the ids,
    # and ids must be 0..len-1 for the model's embedding table.
    return list(dict.fromkeys(tokens))


def _split_pattern() -> str:
    # Ordered alternation, tried left to right at each position: the blank line before a lone
    # newline, spaced operators before a lone space, whole words (\b both sides, so "Adds" is not
    # "Add" + "s") before single characters. Everything else is one character, never unmatched.
    words = "|".join(_words())
    return rf"\n\n|\n| [-+*=] | ?\b(?:{words})\b|."


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """The demo's tokenizer: word level, digits and the step delimiter single tokens, ChatML chat."""
    # Imported here: grading and prompts import this module, and must not pay for transformers.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_split_pattern()), behavior="isolated")
    # Pieces carry their own spaces and newlines, so decoding is plain concatenation.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[BOS_TURN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def save_demo_tokenizer(path: str | Path) -> Path:
    """Write tokenizer.json and tokenizer_config.json, the chat template and special tokens inside."""
    path = Path(path)
    # The template goes into tokenizer_config.json, as in the Qwen2.5 checkpoints, rather than a
    # chat_template.jinja beside it that older transformers versions do not read.
    build_demo_tokenizer().save_pretrained(path, save_jinja_files=False)
    return path
