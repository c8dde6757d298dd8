"""`steer-jax sweep`: a config run at every point of a grid over any of its options, the models
loaded once per checkpoint setting; one run directory per point and a table (sweep.md).

A grid is config keys, each with a list of values (`--grid steer.percentile=0.1,0.3
--grid steer.confidence=max_logit,max_prob`: their cross product, the first key outermost).
Keys are the config's, dotted as `--set` spells them (`method`, `steer.groups`,
`specreason.threshold`, ...); values are YAML scalars. Every point is validated before any run
starts. A point's directory is named by its values, `KEY_VALUE` joined by `__` (the last part of
each key, or the whole key where two share it): `gamma_0.5`, `percentile_0.1__confidence_max_prob`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from steer_jax.modeling.loading import load_tokenizer
from steer_jax.parts import write_atomic
from steer_jax.run_config import SCHEMA, RunConfigError, check_tokenizers, set_key, validate
from steer_jax.runner import Summary, load_models, run

Grid = dict[str, list[Any]]  # config key, dotted -> its values, in order
DEFAULT_GAMMAS = "0.1,0.3,0.5,0.7,0.9"
# What decides the loaded models: points that differ in these load their own.
MODEL_KEYS = ("small", "large", "dtype", "scan_layers", "cpu_kernels")
# One sweep runs in one set of processes.
FIXED_SECTIONS = ("distributed",)


def check_key(key: str) -> None:
    """A grid key must name one config value, as `--set` does."""
    section, _, leaf = key.partition(".")
    if section not in SCHEMA:
        raise RunConfigError(f"grid key {key!r} is not a config key (top level: "
                             f"{', '.join(SCHEMA)})")
    keys = SCHEMA[section]
    if keys is None and leaf:
        raise RunConfigError(f"grid key {key!r}: {section} is a value, not a section")
    if keys is not None and leaf not in keys:
        raise RunConfigError(f"grid key {key!r} is not a config key ({section} takes "
                             f"{', '.join(keys)})")
    if section in FIXED_SECTIONS:
        raise RunConfigError(f"grid key {key!r}: a sweep runs every point in one set of "
                             "processes; set distributed.* in the config")


def _values(key: str, text: str) -> list[Any]:
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or "" in items:
        raise RunConfigError(f"grid {key}={text!r}: a value is empty (write KEY=V1,V2,...)")
    if "..." in items:
        raise RunConfigError(f"grid {key}={text!r}: write every value out (ranges with ... are "
                             "not expanded)")
    values = []
    for item in items:
        try:
            value = yaml.safe_load(item)
        except yaml.YAMLError as e:
            raise RunConfigError(f"grid {key}: {item!r} is not a YAML scalar ({e})") from None
        if isinstance(value, (list, dict)):
            raise RunConfigError(f"grid {key}: {item!r} is not a scalar value")
        if _text(value) in map(_text, values):
            raise RunConfigError(f"grid {key}: the value {item!r} is listed twice")
        values.append(value)
    return values


def parse_grid(items: Sequence[str]) -> Grid:
    """`KEY=V1,V2,...` items (each key once) as a grid; keys checked, values parsed as YAML."""
    grid: Grid = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RunConfigError(f"grid {item!r} is not of the form KEY=V1,V2,...")
        check_key(key)
        if key in grid:
            raise RunConfigError(f"grid key {key!r} is given twice")
        grid[key] = _values(key, text)
    return grid


def _text(value: Any) -> str:
    """A value as YAML spells it, floats as short as they go."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return str(value)


def _dir_name(values: Mapping[str, Any]) -> str:
    leaves = [k.rpartition(".")[2] for k in values]
    parts = []
    for key, leaf in zip(values, leaves):
        name = leaf if leaves.count(leaf) == 1 else key.replace(".", "_")
        parts.append(f"{name}_{re.sub(r'[^A-Za-z0-9_.+-]+', '-', _text(values[key]))}")
    return "__".join(parts)


@dataclass(frozen=True)
class Point:
    values: dict[str, Any]  # grid key -> this point's value
    name: str  # its run directory under the sweep's
    config: dict[str, Any]  # the run config at this point (not validated)


def grid_points(config: dict[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[Point]:
    """Every point of `grid` over `config`, each validated (an error names the point) and with a
    run directory of its own."""
    if not grid:
        raise RunConfigError("a sweep needs a grid: at least one KEY=V1,V2,...")
    for key, values in grid.items():
        check_key(key)
        if not values:
            raise RunConfigError(f"grid key {key!r} has no values")
    points, names = [], {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        cfg = config
        for key, value in values.items():
            cfg = set_key(cfg, key, value)
        name = _dir_name(values)
        if name in names:
            raise RunConfigError(f"grid points {names[name]} and {values} would share the run "
                                 f"directory {name!r}: give values that differ in their text")
        names[name] = values
        try:
            validate(cfg)
        except RunConfigError as e:
            shown = ", ".join(f"{k}={_text(v)}" for k, v in values.items())
            raise RunConfigError(f"grid point {shown}: {e}") from None
        points.append(Point(values=values, name=name, config=cfg))
    return points


def _model_key(point: Point) -> tuple:
    cfg, _ = validate(point.config)
    return tuple(repr(cfg[k]) for k in MODEL_KEYS)


def sweep(config: dict[str, Any], grid: Mapping[str, Sequence[Any]] | Sequence[float],
          out: str | Path, progress: Callable[[int, int, str], None] | None = None, *,
          resume: bool = False, checkpoint_every: int | None = None) -> list[Summary]:
    """`config` run at every point of `grid` (key -> values; a plain list of numbers: gammas,
    `steer.gamma`); one run directory per point and a table, sweep.md. Every point is validated
    and every checkpoint pair's tokenizers compared before the first run; the models are loaded
    once per checkpoint setting.

    `resume` and `checkpoint_every` are `run`'s, for each point: a resumed sweep reads the points
    it finished back from their parts and continues the one it was in.
    """
    if not isinstance(grid, Mapping):
        grid = {"steer.gamma": list(grid)}
    points = grid_points(config, grid)
    order = sorted(points, key=_model_key)  # stable: the grid's order within one model setting
    for key in dict.fromkeys(_model_key(p) for p in order):
        cfg, _ = validate(next(p.config for p in order if _model_key(p) == key))
        check_tokenizers(load_tokenizer(cfg["small"]), load_tokenizer(cfg["large"]),
                         cfg["small"], cfg["large"])
    out = Path(out)
    summaries: dict[str, Summary | None] = {}
    loaded_for, models = None, None
    for point in order:
        if _model_key(point) != loaded_for:
            models = None  # the previous setting's weights go before the next ones load
            cfg, _ = validate(point.config)
            models = (*load_models(cfg), load_tokenizer(cfg["small"]))
            loaded_for = _model_key(point)
        summaries[point.name] = run(point.config, out / point.name, models=models,
                                    progress=progress, resume=resume,
                                    checkpoint_every=checkpoint_every)
    if None in summaries.values():  # not process 0 of a multi-process sweep: it writes the table
        return []
    done = [summaries[p.name] for p in points]
    write_atomic(out / "sweep.md", _table(grid, points, done))
    return done


def _table(grid: Mapping[str, Sequence[Any]], points: list[Point], summaries: list) -> str:
    rows = ["| " + " | ".join([*grid, "accuracy", "FLOPs (1e12/query)", "A/F", "large steps",
                               "run", "wall s"]) + " |",
            "|" + "---|" * (len(grid) + 6)]
    for p, s in zip(points, summaries):
        rows.append("| " + " | ".join(_text(v) for v in p.values.values())
                    + f" | {s.accuracy:.3f} | {s.flops_per_query:.4g} | {s.a_per_f:.4g} | "
                    f"{s.large_step_fraction:.1%} | {p.name} | {s.wall_s:.1f} |")
    return "\n".join(rows) + "\n"
