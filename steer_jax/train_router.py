"""`steer-jax train-router`: the query router's training run. small_only and large_only answer a
training slice of the benchmark, `router.samples` times each (seeds `sampling.seed` + 0, 1, ...);
which queries the large model solves more often than the small one is the label."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

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
    correct = sampled_correctness(config, cfg["router"]["samples"], cfg["sampling"]["seed"],
                                  lambda run_cfg: _graded(run_cfg, models, progress))
    from steer_jax.eval import render_prompt

    prompts = [tokenizer(render_prompt(tokenizer, ex, train["name"]),
                         add_special_tokens=False)["input_ids"] for ex in examples_of(train)]
    router = train_router(prompt_features(models[0], prompts),
                          labels_from_runs(correct["small_only"], correct["large_only"]))
    save_router(router, out, overwrite=True)
    return Path(out)


def sampled_correctness(config: dict[str, Any], samples: int, seed: int,
                        graded: Callable[[dict[str, Any]], list[bool]]) -> dict[str, np.ndarray]:
    """Bool [samples, questions] per baseline: `graded` (a run's per-question correctness) over
    `router.train`, run k with `sampling.seed` = seed + k, so each run draws other samples
    (sampling keys fold the seed; run 0 is the config's own seed)."""
    out = {}
    for method in ("small_only", "large_only"):
        runs = []
        for k in range(samples):
            sampling = {**(config.get("sampling") or {}), "seed": seed + k}
            runs.append(graded({**config, "method": method, "sampling": sampling,
                                "benchmark": config["router"]["train"]}))
        out[method] = np.asarray(runs, dtype=bool)
    return out


def _graded(config: dict[str, Any], models: tuple, progress: Any) -> list[bool]:
    with tempfile.TemporaryDirectory() as d:
        run(config, d, models=models, progress=progress)
        lines = (Path(d) / "traces.jsonl").read_text().splitlines()
    return [json.loads(x)["correct"] for x in lines]
