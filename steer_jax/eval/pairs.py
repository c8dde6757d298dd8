"""Which of the paper's model pairs a run used: what puts its rows beside the paper's.

The rule, first that applies:
1. a `pair` the run states: summary.json's `pair`, else the `pair` key of the config it ran with
   (OUT/parts/config.json; configs/paper/*.yaml set it, `--set pair=...` does for any config);
2. the checkpoint names in that config: `small` and `large` each have a path component named as
   the pair's Hugging Face checkpoint (case aside; a hub cache folder `models--org--NAME` too);
3. else none: the run's rows have no paper row beside them.
Parameter counts cannot decide it: Qwen2.5-Math-1.5B/7B and Qwen2.5-1.5B/7B have the same.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any

from steer_jax.eval.runs import Run

# The paper's pair names (../shared/paper/results.csv) -> (small, large) Hugging Face names.
PAPER_PAIRS: dict[str, tuple[str, str]] = {
    "gemma-3-4b-12b": ("gemma-3-4b-it", "gemma-3-12b-it"),
    "qwen2.5-math-1.5b-7b": ("Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-7B-Instruct"),
    "qwen2.5-1.5b-7b": ("Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct"),
}
CONFIG_STAMP = Path("parts") / "config.json"  # the validated config a run ran with (parts.Parts)


def run_config(run: Run) -> dict[str, Any]:
    """The config `run` ran with, as its parts folder keeps it; {} when that file is absent."""
    path = run.path / CONFIG_STAMP
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None
    return config if isinstance(config, dict) else {}


def names_checkpoint(path: str, name: str) -> bool:
    """Whether a checkpoint path names the Hugging Face checkpoint `name`."""
    name = name.lower()
    return any(part.lower() == name or part.lower().endswith("--" + name)
               for part in PurePath(path).parts)


def pair_of(run: Run) -> str | None:
    """The paper pair `run` used, by the rule in this module's docstring; None if unknown."""
    config = run_config(run)
    stated = run.summary.get("pair") or config.get("pair")
    if stated:
        return str(stated)
    small, large = config.get("small"), config.get("large")
    if not (isinstance(small, str) and isinstance(large, str)):
        return None
    for pair, (small_name, large_name) in PAPER_PAIRS.items():
        if names_checkpoint(small, small_name) and names_checkpoint(large, large_name):
            return pair
    return None
