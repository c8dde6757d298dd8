"""configs/paper: one YAML per paper setting, all in the run-config schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from steer_jax.eval import BENCHMARKS
from steer_jax.eval.benchmarks import MATH_BENCHMARKS

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
BROAD = ("acpbench", "musique", "korbench_cipher", "korbench_counterfactual", "korbench_logic")
SETTINGS = {
    ("Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-7B-Instruct"): set(MATH_BENCHMARKS),
    ("gemma-3-4b-it", "gemma-3-12b-it"): set(BENCHMARKS),
    ("Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct"): set(BROAD),
}
KEYS = {"small", "large", "method", "benchmark", "sampling", "steer", "batch"}
STEER_KEYS = {
    "gamma",
    "max_steps",
    "max_step_tokens",
    "max_new_tokens",
    "delimiter",
    "confidence",
    "aggregate",
    "source",
    "groups",
    "refine",
    "policy",
    "percentile",
    "threshold",
}


def _configs() -> list[Path]:
    return sorted(PAPER.glob("*.yaml"))


def test_every_paper_setting_has_exactly_one_config() -> None:
    seen: dict[tuple[str, str], list[str]] = {}
    for path in _configs():
        cfg = yaml.safe_load(path.read_text())
        pair = (Path(cfg["small"]).name, Path(cfg["large"]).name)
        seen.setdefault(pair, []).append(cfg["benchmark"]["name"])
    assert set(seen) == set(SETTINGS)
    for pair, names in seen.items():
        assert sorted(names) == sorted(SETTINGS[pair]), pair


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.name)
def test_config_schema(path: Path) -> None:
    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert set(cfg) == KEYS
    assert cfg["small"].startswith("/path/to/") and cfg["large"].startswith("/path/to/")
    assert cfg["method"] == "steer"
    assert set(cfg["benchmark"]) == {"name", "path", "limit"}
    assert cfg["benchmark"]["name"] in BENCHMARKS
    assert cfg["sampling"] == {"temperature": 0.7, "top_p": 1.0, "seed": 0}
    steer = cfg["steer"]
    assert set(steer) == STEER_KEYS
    assert steer["delimiter"] == "\n\n"
    assert steer["aggregate"] == ("math" if cfg["benchmark"]["name"] in MATH_BENCHMARKS else "all")
    assert cfg["batch"] == {"size": None}
    # The paper's numbers are to be compared against; the comment says where they stand.
    assert "Paper numbers" in text and "arXiv:2511.06190" in text
