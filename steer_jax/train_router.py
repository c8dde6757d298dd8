"""`steer-jax train-router`: the query router's training run. small_only and large_only answer a
training slice of the benchmark; which queries only the large model gets right is the label."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from steer_jax.modeling.loading import load_tokenizer
from steer_jax.run_config import RunConfigError, check_tokenizers, examples_of, validate
from steer_jax.runner import load_models, run


def train_router_from_config(config: dict[str, Any], out: str | Path,
                             progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Train the query router on `router.train` (a benchmark slice disjoint from the test one):
    small_only and large_only runs label which queries need the large model."""
    from steer_jax.baselines.query_router import (labels_from_runs, prompt_features,
                                                  save_router, train_router)

    cfg, _ = validate({**config, "method": "small_only"})
    train = cfg["router"]["train"]
    if not isinstance(train, dict) or not train.get("name"):
        raise RunConfigError("router.train must name the training slice: {name, path, offset, "
                             "limit}")
    tokenizer = load_tokenizer(cfg["small"])
    check_tokenizers(tokenizer, load_tokenizer(cfg["large"]), cfg["small"], cfg["large"])
    models = (*load_models(cfg), tokenizer)
    correct = {}
    for method in ("small_only", "large_only"):
        run_cfg = {**config, "method": method, "benchmark": train}
        correct[method] = _graded(run_cfg, models, progress)
    from steer_jax.eval import render_prompt

    prompts = [tokenizer(render_prompt(tokenizer, ex, train["name"]),
                         add_special_tokens=False)["input_ids"] for ex in examples_of(train)]
    router = train_router(prompt_features(models[0], prompts),
                          labels_from_runs(correct["small_only"], correct["large_only"]))
    save_router(router, out, overwrite=True)
    return Path(out)


def _graded(config: dict[str, Any], models: tuple, progress: Any) -> list[bool]:
    with tempfile.TemporaryDirectory() as d:
        run(config, d, models=models, progress=progress)
        lines = (Path(d) / "traces.jsonl").read_text().splitlines()
    return [json.loads(x)["correct"] for x in lines]
