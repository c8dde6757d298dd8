"""`steer-jax sweep`: STEER at each of several gammas, the models loaded once; one run directory
per value and a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from steer_jax.modeling.loading import load_tokenizer
from steer_jax.run_config import check_tokenizers, validate
from steer_jax.runner import Summary, load_models, run
from steer_jax.parts import write_atomic


def sweep(config: dict[str, Any], gammas: Sequence[float], out: str | Path,
          progress: Callable[[int, int, str], None] | None = None, *, resume: bool = False,
          checkpoint_every: int | None = None) -> list[Summary]:
    """STEER at each gamma (models loaded once); one run directory per value and a table.

    `resume` and `checkpoint_every` are `run`'s, for each value: a resumed sweep reads the
    values it finished back from their parts and continues the one it was in.
    """
    cfg, _ = validate(config)
    for g in gammas:  # all values checked before any run starts
        validate({**config, "steer": {**config.get("steer", {}), "gamma": g}})
    tokenizer, tok_large = load_tokenizer(cfg["small"]), load_tokenizer(cfg["large"])
    check_tokenizers(tokenizer, tok_large, cfg["small"], cfg["large"])
    models = (*load_models(cfg), tokenizer)
    out = Path(out)
    summaries = []
    for g in gammas:
        run_cfg = {**config, "method": "steer", "steer": {**config.get("steer", {}), "gamma": g}}
        summaries.append(run(run_cfg, out / f"gamma_{g:g}", models=models, progress=progress,
                             resume=resume, checkpoint_every=checkpoint_every))
    if None in summaries:  # not process 0 of a multi-process sweep: it writes the table
        return []
    rows = ["| gamma | accuracy | FLOPs (1e12/query) | A/F | large steps | wall s |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {s.gamma:g} | {s.accuracy:.3f} | {s.flops_per_query:.4g} | {s.a_per_f:.4g} | "
             f"{s.large_step_fraction:.1%} | {s.wall_s:.1f} |" for s in summaries]
    write_atomic(out / "sweep.md", "\n".join(rows) + "\n")
    return summaries
