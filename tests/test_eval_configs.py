"""configs/paper: one YAML per paper setting, all in the run-config schema."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from steer_jax.eval import BENCHMARKS
from steer_jax.eval.benchmarks import MATH_BENCHMARKS
from steer_jax.eval.pairs import PAPER_PAIRS

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
BROAD = ("acpbench", "musique", "korbench_cipher", "korbench_counterfactual", "korbench_logic")
SETTINGS = {
    ("Qwen2.5-Math-1.5B-Instruct", "Qwen2.5-Math-7B-Instruct"): set(MATH_BENCHMARKS),
    ("gemma-3-4b-it", "gemma-3-12b-it"): set(BENCHMARKS),
    ("Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct"): set(BROAD),
}
KEYS = {"small", "large", "pair", "method", "benchmark", "sampling", "steer", "batch"}
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
    # The pair the report matches the paper's rows by: the one its checkpoints are.
    assert PAPER_PAIRS[cfg["pair"]] == (Path(cfg["small"]).name, Path(cfg["large"]).name)
    assert path.name.startswith(cfg["pair"] + "_")
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


FIGURE = re.compile(r"^#   (\w+)\s+Acc\s+([\d.]+)\s+FLOPs \(1e12/query\)\s+([\d.]+)\s+A/F ([\d.]+)$")
# The tokenizers ../shared/data/hf holds for each pair's small model (Gemma's has no vocabulary
# there); each config's models' context comes from the real config.json.
TOKENIZERS = {"Qwen2.5-Math-1.5B-Instruct": "Qwen2.5-Math-1.5B",
              "Qwen2.5-1.5B-Instruct": "Qwen2.5-1.5B-Instruct"}


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.name)
def test_config_carries_the_papers_figures_from_its_tables(path: Path, paper_results: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    bench = cfg["benchmark"]["name"]
    bench = "korbench" if bench.startswith("korbench_") else bench
    pair = path.name.split("_")[0]
    with paper_results.open() as f:
        want = {r["method"]: (r["accuracy"], r["flops_per_query_1e12"], r["a_per_f"])
                for r in csv.DictReader(f) if r["pair"] == pair and r["benchmark"] == bench}
    shown = {m.group(1): m.groups()[1:] for m in map(FIGURE.match, path.read_text().splitlines()) if m}
    assert want and shown == want


@pytest.mark.parametrize("path", [p for p in _configs() if not p.name.startswith("gemma")],
                         ids=lambda p: p.name)
def test_config_fits_its_models_real_context(path: Path, hf_meta: Path, shared_data: Path) -> None:
    """Every question of the benchmark through the real tokenizer and chat template, against the
    real context, as `steer-jax run` checks it before compute; then the longest, with
    SpecReason's judge prompt after it, through `prepare` on random models of the real context
    and vocabulary (the run's layout: every cache allocated, nothing decoded)."""
    import jax

    from steer_jax.modeling import families
    from steer_jax.modeling.loading import read_config
    from steer_jax.modeling.module import init_params
    from steer_jax.modeling.transformer import Model
    from steer_jax.run_config import validate
    from steer_jax.runner import _inputs
    from steer_jax.steer import prepare

    config = yaml.safe_load(path.read_text())
    small, large = (Path(config[k]).name for k in ("small", "large"))
    real = hf_meta / TOKENIZERS[small]
    config = {**config, "small": str(real), "large": str(real),
              "benchmark": {**config["benchmark"], "path": str(shared_data)}}
    cfg, opts = validate(config)
    tok, _, prompts = _inputs(cfg, opts, None)  # raises RunConfigError for a prompt too long
    ctx = min(read_config(real).max_position_embeddings,
              read_config(hf_meta / large).max_position_embeddings
              if (hf_meta / large / "config.json").is_file()
              else families.known(large).max_position_embeddings)
    tiny = dataclasses.replace(read_config(real), hidden_size=16, intermediate_size=32, num_layers=1,
                               num_heads=2, num_kv_heads=1, head_dim=8, sliding_layers=(False,),
                               max_position_embeddings=ctx)
    model = Model(tiny, init_params(tiny, jax.random.key(0), jax.numpy.float32))
    longest = max(prompts, key=len)
    _, state = prepare(model, model, tok, [longest], method="specreason",
                       max_new_tokens=opts.max_new_tokens, page_size=64)
    assert state.caches[0].pages.shape[1] * 64 <= ctx + 64
