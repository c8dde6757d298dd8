"""Loaders over every real benchmark file of the shared data folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steer_jax.eval import BENCHMARKS, Example, load_benchmark
from steer_jax.eval.benchmarks import ACPBENCH_TASKS

# Meta fields each loader documents, and the record count of the shared copy (SOURCES.md).
EXPECTED = {
    "math500": (500, {"level", "subject"}),
    "omnimath": (2821, {"difficulty", "domain", "source"}),
    "aime": (120, {"year", "contest", "number"}),
    "acpbench": (900, {"task", "group", "choices", "query"}),
    "musique": (2417, {"answer_aliases"}),
    "korbench_cipher": (250, {"subset", "rule_id", "rule_title", "rule_content", "category"}),
    "korbench_counterfactual": (250, {"subset", "rule_id", "rule_title", "rule_content", "real_life_answer"}),
    "korbench_logic": (250, {"subset", "rule_id", "rule_title", "rule_content"}),
}


def _check(examples: list[Example], meta_keys: set[str]) -> None:
    assert examples
    assert len({e.id for e in examples}) == len(examples), "ids must be unique"
    for e in examples:
        assert isinstance(e, Example)
        assert isinstance(e.id, str) and e.id
        assert isinstance(e.question, str) and e.question.strip()
        assert isinstance(e.reference, str) and e.reference.strip()
        missing = meta_keys - set(e.meta)
        assert not missing, f"{e.id} lacks meta {missing}"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_loader_reads_the_shared_root(shared_data: Path, name: str) -> None:
    count, meta_keys = EXPECTED[name]
    examples = load_benchmark(name, shared_data)
    assert len(examples) == count
    _check(examples, meta_keys)


def test_math500_fields_match_the_file(shared_data: Path) -> None:
    rows = [json.loads(line) for line in (shared_data / "math500" / "test.jsonl").read_text().splitlines()]
    examples = load_benchmark("math500", shared_data / "math500" / "test.jsonl")
    assert [e.id for e in examples] == [r["unique_id"] for r in rows]
    assert [e.reference for e in examples] == [r["answer"] for r in rows]
    assert {e.meta["level"] for e in examples} == {1, 2, 3, 4, 5}
    assert all(isinstance(e.meta["level"], int) for e in examples)


def test_omnimath_difficulty_is_a_float_in_range(shared_data: Path) -> None:
    examples = load_benchmark("omnimath", shared_data / "omnimath")
    assert all(1.0 <= e.meta["difficulty"] <= 10.0 for e in examples)


def test_aime_each_file_and_contest_order(shared_data: Path) -> None:
    folder = shared_data / "aime"
    per_file = {f.name: load_benchmark("aime", f) for f in sorted(folder.glob("*.jsonl"))}
    assert {k: len(v) for k, v in per_file.items()} == {
        "aime2025-I.jsonl": 15,
        "aime2025-II.jsonl": 15,
        "aime_2022_2024.jsonl": 90,
    }
    years = [e.meta["year"] for e in load_benchmark("aime", folder)]
    assert years == sorted(years) and set(years) == {2022, 2023, 2024, 2025}
    ii = per_file["aime2025-II.jsonl"]
    assert [e.meta["number"] for e in ii] == list(range(1, 16))  # line order is problem order
    assert {(e.meta["year"], e.meta["contest"]) for e in ii} == {(2025, "II")}
    assert ii[0].reference == "468"
    first = per_file["aime_2022_2024.jsonl"][0]
    assert first.id == "aime/2022-I-1"


def test_acpbench_tasks_folders_and_files(shared_data: Path) -> None:
    root = shared_data / "acpbench"
    everything = load_benchmark("acpbench", root)
    assert {e.meta["task"] for e in everything} == set(ACPBENCH_TASKS)
    for task in ACPBENCH_TASKS:
        for split, n in (("test", 120 if task == "areach" else 130), ("dev", 40)):
            examples = load_benchmark("acpbench", root / task / f"{split}.mcq.json")
            assert len(examples) == n
            _check(examples, EXPECTED["acpbench"][1])
    one_task = load_benchmark("acpbench", root / "prog")
    assert {e.meta["task"] for e in one_task} == {"prog"}
    for e in everything:
        assert e.reference in e.meta["choices"]["label"]
        assert e.meta["choices"]["label"] == ["A", "B", "C", "D"]
        # The context and the option list both reach the question.
        assert all(text[:20] in e.question for text in e.meta["choices"]["text"])


def test_korbench_links_each_sample_to_its_rule(shared_data: Path) -> None:
    for subset in ("cipher", "counterfactual", "logic"):
        folder = shared_data / "korbench" / subset
        rules = {r["idx"]: r for r in map(json.loads, (folder / "rule.jsonl").read_text().splitlines())}
        for via in (shared_data, shared_data / "korbench", folder, folder / "sample.jsonl"):
            examples = load_benchmark(f"korbench_{subset}", via)
            assert len(examples) == 250
        for e in examples:
            assert e.meta["rule_content"] == rules[e.meta["rule_id"]]["rule_content"]
            assert e.reference.startswith("[[") and e.reference.endswith("]]")


def test_musique_first_row(shared_data: Path) -> None:
    first = load_benchmark("musique", shared_data / "musique", limit=1)
    assert len(first) == 1
    assert first[0].question == "Who is the spouse of the Green performer?"
    assert first[0].reference == "Miquette Giraudy"


def test_limit_unknown_name_and_missing_path(shared_data: Path, tmp_path: Path) -> None:
    assert len(load_benchmark("math500", shared_data, limit=7)) == 7
    assert load_benchmark("math500", shared_data, limit=0) == []
    with pytest.raises(ValueError, match="gsm8k"):
        load_benchmark("gsm8k", shared_data)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_benchmark("math500", missing)
    with pytest.raises(FileNotFoundError, match="korbench_logic"):
        load_benchmark("korbench_logic", tmp_path)
    with pytest.raises(ValueError):
        load_benchmark("math500", shared_data, limit=-1)
