"""The paper's six benchmarks as lists of `Example`, from local files or from the Hugging Face hub.

Local layouts are those of the shared data folder (see its SOURCES.md):

    math500/test.jsonl                      problem, solution, answer, subject, level, unique_id
    omnimath/omni_math_rule.jsonl           domain, difficulty, problem, solution, answer, source
    aime/*.jsonl                            {id, problem, answer, url} or {question, answer}
    acpbench/<task>/test.mcq.json           id, group, context, question, choices, query, answer
    musique/*.json                          a JSON list of {question, answer}, or the original
                                            jsonl with id, answer_aliases, paragraphs, answerable
    korbench/<subset>/{sample,rule}.jsonl   questions, and the rules they refer to by rule_id

`path` may name the benchmark's folder, a parent folder holding it (the shared data root), or one
file. Without a path the usual hub dataset is read with `datasets`; that branch needs network
access, is not exercised by the tests, and is kept to a thin field mapping onto the same records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from steer_jax.eval import demo_task
from steer_jax.eval.example import Example

MATH_BENCHMARKS = ("math500", "omnimath", "aime")
KORBENCH_SUBSETS = ("cipher", "counterfactual", "logic")
BENCHMARKS = (
    *MATH_BENCHMARKS,
    "acpbench",
    "musique",
    *(f"korbench_{s}" for s in KORBENCH_SUBSETS),
)
ACPBENCH_TASKS = ("app", "areach", "just", "land", "prog", "reach", "val")
# The embedded demo's synthetic benchmark (steer_jax.eval.demo_task); not one of the paper's, so
# not in BENCHMARKS, which the paper's configs and tables iterate over.
DEMO = "demo"


def canonical_name(name: str) -> str:
    """The benchmark key for `name` (case and dashes forgiven); ValueError names the unknown one."""
    key = name.strip().lower().replace("-", "_")
    aliases = {"math_500": "math500", "omni_math": "omnimath"}
    key = aliases.get(key, key)
    if key not in (*BENCHMARKS, DEMO):
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join((*BENCHMARKS, DEMO))}")
    return key


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json_or_jsonl(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict):  # {"data": [...]} wrappers
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    return list(data)


def _locate(path: Path, name: str, folder: str, pattern: str) -> list[Path]:
    """Files of one benchmark under `path`: the file itself, path/<pattern> or path/folder/<pattern>."""
    if not path.exists():
        raise FileNotFoundError(f"{name}: path {path} does not exist")
    if path.is_file():
        return [path]
    for base in (path, path / folder):
        files = sorted(p for p in base.glob(pattern) if p.is_file())
        if files:
            return files
    raise FileNotFoundError(f"{name}: no {pattern} under {path} or {path / folder}")


# ---- math ------------------------------------------------------------------------------------


def _math500(records: Iterable[dict]) -> list[Example]:
    return [
        Example(
            id=r["unique_id"],
            question=r["problem"],
            reference=str(r["answer"]),
            meta={"level": int(r["level"]), "subject": r["subject"], "solution": r["solution"]},
        )
        for r in records
    ]


def _omnimath(records: Iterable[dict]) -> list[Example]:
    return [
        Example(
            id=f"omnimath/{i}",
            question=r["problem"],
            reference=str(r["answer"]),
            meta={
                "difficulty": float(r["difficulty"]),
                "domain": list(r["domain"]),
                "source": r.get("source"),
                "solution": r.get("solution"),
            },
        )
        for i, r in enumerate(records)
    ]


_AOPS_URL = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d+)")


def _aime_meta(record: dict, file_stem: str, index: int) -> dict[str, Any]:
    m = _AOPS_URL.search(record.get("url") or "")
    if m:
        return {"year": int(m.group(1)), "contest": m.group(2), "number": int(m.group(3))}
    # aime2025-I.jsonl and the like: the file names the contest, the line is the problem number.
    f = re.search(r"(\d{4})[-_]?(I{1,2})\b", file_stem)
    if f:
        return {"year": int(f.group(1)), "contest": f.group(2), "number": index + 1}
    return {"number": index + 1}


def _aime(files: Iterable[tuple[str, list[dict]]]) -> list[Example]:
    out = []
    for stem, records in files:
        for i, r in enumerate(records):
            meta = _aime_meta(r, stem, i)
            if "year" in meta:
                ex_id = f"aime/{meta['year']}-{meta['contest']}-{meta['number']}"
            else:
                ex_id = f"aime/{stem}/{r.get('id', i)}"
            out.append(
                Example(
                    id=ex_id,
                    question=r.get("problem") or r["question"],
                    reference=str(r["answer"]),
                    meta=meta,
                )
            )
    return out


# ---- broad domains ----------------------------------------------------------------------------


def _acpbench(records: Iterable[tuple[str, dict]]) -> list[Example]:
    out = []
    for task, r in records:
        choices = r["choices"]
        out.append(
            Example(
                id=f"acpbench/{task}/{r['id']}",
                # The question field already lists the options as "A. ... B. ...".
                question=f"{r['context'].strip()}\n\n{r['question'].strip()}",
                reference=str(r["answer"]).strip(),
                meta={
                    "task": task,
                    "group": r.get("group"),
                    "choices": {"label": list(choices["label"]), "text": list(choices["text"])},
                    "query": r.get("query"),
                },
            )
        )
    return out


def _musique(records: Iterable[dict]) -> list[Example]:
    out = []
    for i, r in enumerate(records):
        if r.get("answerable") is False:  # the original dev file mixes in unanswerable ones
            continue
        meta: dict[str, Any] = {"answer_aliases": list(r.get("answer_aliases") or [])}
        ex_id = r.get("id") or f"musique/{i}"
        # "2hop__460946_294723": the hop count is the question's difficulty.
        m = re.match(r"(\d)hop", str(ex_id))
        if m:
            meta["hops"] = int(m.group(1))
        out.append(Example(id=str(ex_id), question=r["question"], reference=str(r["answer"]), meta=meta))
    return out


def _korbench(subset: str, samples: Iterable[dict], rules: Iterable[dict]) -> list[Example]:
    by_id = {str(r["idx"]): r for r in rules}
    out = []
    for s in samples:
        rule_id = str(s["rule_id"])
        if rule_id not in by_id:
            raise ValueError(f"korbench_{subset}: sample {s['idx']} refers to missing rule {rule_id}")
        rule = by_id[rule_id]
        meta: dict[str, Any] = {
            "subset": subset,
            "rule_id": rule_id,
            "rule_title": rule.get("title", ""),
            "rule_content": rule["rule_content"],
            "tag": rule.get("tag", ""),
        }
        if "category" in s:
            meta["category"] = s["category"]
        if "real_life_answer" in s:
            meta["real_life_answer"] = s["real_life_answer"]
        out.append(
            Example(
                id=f"korbench/{subset}/{s['idx']}",
                question=s["question"],
                reference=str(s["answer"]),
                meta=meta,
            )
        )
    return out


# ---- local ------------------------------------------------------------------------------------


def _load_local(name: str, path: Path) -> list[Example]:
    if name == "math500":
        return _math500(_read_jsonl(_locate(path, name, "math500", "*.jsonl")[0]))
    if name == "omnimath":
        return _omnimath(_read_jsonl(_locate(path, name, "omnimath", "*.jsonl")[0]))
    if name == "aime":
        files = _locate(path, name, "aime", "*.jsonl")
        examples = _aime((f.stem, _read_jsonl(f)) for f in files)
        # Several files (2022-2024, 2025 I, 2025 II) read in contest order, not file-name order.
        return sorted(
            examples, key=lambda e: (e.meta.get("year", 0), e.meta.get("contest", ""), e.meta["number"])
        )
    if name == "acpbench":
        return _acpbench(_acpbench_local(path))
    if name == "musique":
        return _musique(_read_json_or_jsonl(_locate(path, name, "musique", "*.json*")[0]))
    subset = name.removeprefix("korbench_")
    sample = _korbench_file(path, subset, "sample")
    return _korbench(subset, _read_jsonl(sample), _read_jsonl(sample.with_name("rule.jsonl")))


def _acpbench_local(path: Path) -> list[tuple[str, dict]]:
    """Test MCQ records of every task; a task folder or a single file reads just that one."""
    if not path.exists():
        raise FileNotFoundError(f"acpbench: path {path} does not exist")
    if path.is_file():
        return [(path.parent.name, r) for r in _read_json_or_jsonl(path)]
    for root in (path, path / "acpbench"):
        if (root / "test.mcq.json").is_file():
            return [(root.name, r) for r in _read_json_or_jsonl(root / "test.mcq.json")]
        tasks = [t for t in ACPBENCH_TASKS if (root / t / "test.mcq.json").is_file()]
        if tasks:
            return [(t, r) for t in tasks for r in _read_json_or_jsonl(root / t / "test.mcq.json")]
    raise FileNotFoundError(f"acpbench: no <task>/test.mcq.json under {path}")


def _korbench_file(path: Path, subset: str, kind: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"korbench_{subset}: path {path} does not exist")
    if path.is_file():
        return path
    for base in (path, path / subset, path / "korbench" / subset, path / "data" / subset):
        if (base / f"{kind}.jsonl").is_file():
            return base / f"{kind}.jsonl"
    raise FileNotFoundError(f"korbench_{subset}: no {kind}.jsonl under {path} or {path / subset}")


# ---- hub (needs network; not exercised by the tests) ------------------------------------------


def _hub(dataset_id: str, split: str, config: str | None = None) -> list[dict]:
    import datasets  # imported here: loading local files must not pay for it

    return [dict(r) for r in datasets.load_dataset(dataset_id, config, split=split)]


def _korbench_hub(subset: str) -> list[Example]:
    # The rules live in a file of their own next to the samples, which a `datasets` split does not
    # carry, so the repository files are fetched as they are and read like a local folder.
    from huggingface_hub import snapshot_download

    root = Path(snapshot_download("KOR-Bench/KOR-Bench", repo_type="dataset", allow_patterns=[f"*{subset}*"]))
    for sample in sorted(root.rglob("sample.jsonl")):
        if sample.parent.name == subset:
            return _korbench(subset, _read_jsonl(sample), _read_jsonl(sample.with_name("rule.jsonl")))
    raise FileNotFoundError(
        f"korbench_{subset}: the hub copy has no {subset}/sample.jsonl; pass path= to a checkout of "
        "github.com/KOR-Bench/KOR-Bench data/ instead"
    )


_HUB: dict[str, Callable[[], list[Example]]] = {
    "math500": lambda: _math500(_hub("HuggingFaceH4/MATH-500", "test")),
    "omnimath": lambda: _omnimath(_hub("KbsdJames/Omni-MATH", "test")),
    # AIME 2022-2024, the 90 problems of the shared aime_2022_2024.jsonl.
    "aime": lambda: _aime([("aimo-validation-aime", _hub("AI-MO/aimo-validation-aime", "train"))]),
    "acpbench": lambda: _acpbench(
        (t, r) for t in ACPBENCH_TASKS for r in _hub("ibm-research/acp_bench", "test", f"acp_{t}_mcq")
    ),
    "musique": lambda: _musique(_hub("dgslibisey/MuSiQue", "validation")),
    **{
        f"korbench_{s}": (lambda s=s: _korbench_hub(s))  # bind s now, not at call time
        for s in KORBENCH_SUBSETS
    },
}


def load_benchmark(name: str, path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Examples of benchmark `name`, in file order, the first `limit` of them when given.

    Names: math500, omnimath, aime, acpbench, musique, korbench_cipher, korbench_counterfactual,
    korbench_logic, and demo (generated: without a path its fixed test split, with one the
    test.jsonl that demo_task.write_split stored there). Raises ValueError for an unknown name,
    FileNotFoundError for a missing path.
    """
    key = canonical_name(name)
    if key == DEMO:
        if path is None:
            examples = demo_task.make_split("test")
        else:
            examples = demo_task.read_split(_locate(Path(path).expanduser(), key, DEMO, "test.jsonl")[0])
    else:
        examples = _HUB[key]() if path is None else _load_local(key, Path(path).expanduser())
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        examples = examples[:limit]
    return examples
