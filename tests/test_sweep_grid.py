"""`steer-jax sweep --grid`: grids parsed as YAML scalars, every point checked before any run, one
readable run directory per point; a 2 x 2 grid run for real on the shipped demo pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from steer_jax import cli, sweeps
from steer_jax.eval.pairs import pair_of
from steer_jax.eval.runs import load_run
from steer_jax.run_config import RunConfigError
from steer_jax.sweeps import grid_points, parse_grid

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"small": str(REPO / "models" / "demo-qwen2-small"),
          "large": str(REPO / "models" / "demo-qwen2-large"), "dtype": "float32",
          "pair": "demo-qwen2",
          "benchmark": {"name": "demo", "limit": 3},
          "steer": {"max_steps": 3, "max_step_tokens": 24, "max_new_tokens": 72,
                    "confidence": "max_prob"}}


def test_grids_parse_as_yaml_scalars() -> None:
    grid = parse_grid(["steer.gamma=0.5, 0.9,1", "method=steer,specreason",
                       "steer.threshold=null,-2.5", "benchmark.path=data/x"])
    assert grid == {"steer.gamma": [0.5, 0.9, 1], "method": ["steer", "specreason"],
                    "steer.threshold": [None, -2.5], "benchmark.path": ["data/x"]}
    assert type(grid["steer.gamma"][2]) is int


@pytest.mark.parametrize("items, message", [
    (["steer.gama=0.1"], r"'steer.gama' is not a config key \(steer takes gamma, max_steps"),
    (["stear.gamma=0.1"], r"'stear.gamma' is not a config key \(top level: small"),
    (["method.x=1"], r"method is a value, not a section"),
    (["steer.gamma"], r"not of the form KEY=V1,V2"),
    (["steer.gamma=0.1,,0.3"], r"a value is empty"),
    (["steer.gamma=0.1,0.10"], r"the value '0.10' is listed twice"),
    (["steer.percentile=0.1,...,0.9"], r"write every value out"),
    (["steer.gamma=0.1", "steer.gamma=0.3"], r"'steer.gamma' is given twice"),
    (["steer.gamma=[0.1]"], r"not a scalar"),
    (["distributed.num_processes=1,2"], r"one set of processes"),
])
def test_bad_grids_are_named(items: list[str], message: str) -> None:
    with pytest.raises(RunConfigError, match=message):
        parse_grid(items)


def test_every_point_is_checked_before_any_run(monkeypatch, tmp_path: Path) -> None:
    started = []
    for name in ("run", "load_models", "load_tokenizer"):
        monkeypatch.setattr(sweeps, name, lambda *a, _n=name, **k: started.append(_n))
    grid = parse_grid(["steer.groups=1,2", "steer.confidence=max_logit,max_prob,entropy"])
    with pytest.raises(RunConfigError, match=r"grid point steer.groups=1, steer.confidence=entropy: "
                                             r"steer.confidence must be one of"):
        sweeps.sweep(CONFIG, grid, tmp_path)
    with pytest.raises(RunConfigError, match=r"grid point method=steer, steer.gamma=1.5: steer.gamma "
                                             r"must be in \[0, 1\]"):
        sweeps.sweep(CONFIG, parse_grid(["method=steer", "steer.gamma=0.5,1.5"]), tmp_path)
    assert started == [] and not any(tmp_path.iterdir())


def test_points_get_readable_unique_directories() -> None:
    points = grid_points(CONFIG, parse_grid(["steer.percentile=0.1,0.3",
                                             "steer.confidence=max_logit,neg_entropy"]))
    assert [p.name for p in points] == [
        "percentile_0.1__confidence_max_logit", "percentile_0.1__confidence_neg_entropy",
        "percentile_0.3__confidence_max_logit", "percentile_0.3__confidence_neg_entropy"]
    assert points[1].config["steer"] == {**CONFIG["steer"], "percentile": 0.1,
                                         "confidence": "neg_entropy"}
    assert CONFIG["steer"]["confidence"] == "max_prob"  # the base config is left alone
    # Keys whose last parts agree keep their sections in the name.
    both = grid_points(CONFIG, parse_grid(["steer.threshold=1", "specreason.threshold=6,8"]))
    assert [p.name for p in both] == ["steer_threshold_1__specreason_threshold_6",
                                      "steer_threshold_1__specreason_threshold_8"]
    assert [p.name for p in grid_points(CONFIG, {"steer.gamma": [0.5, 0.9]})] \
        == ["gamma_0.5", "gamma_0.9"]  # today's gamma sweep's names
    with pytest.raises(RunConfigError, match="would share the run directory 'path_a-b'"):
        grid_points(CONFIG, {"benchmark.path": ["a b", "a/b"]})


def test_a_two_by_two_grid_writes_every_point(tmp_path: Path) -> None:
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(config), "--grid", "steer.groups=1,2", "--grid",
                     "method=steer,small_only", "--out", str(out)]) == 0
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| steer.groups | method | accuracy |")
    assert len(table) == 2 + 4
    for line, (groups, method) in zip(table[2:], [(1, "steer"), (1, "small_only"),
                                                  (2, "steer"), (2, "small_only")]):
        run_dir = out / f"groups_{groups}__method_{method}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["method"], summary["options"]["groups"]) == (method, groups)
        assert summary["n"] == 3 and summary["benchmark"] == "demo"
        assert len((run_dir / "traces.jsonl").read_text().splitlines()) == 3
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [str(groups), method, f"{summary['accuracy']:.3f}"]
        assert cells[-2] == run_dir.name
        assert pair_of(load_run(run_dir)) == "demo-qwen2"  # the config's pair, kept with the run
    # K groups fit a mixture each: the K=2 STEER run logged two per round, the K=1 one one.
    rounds = {k: [json.loads(x) for x in (out / f"groups_{k}__method_steer" / "rounds.jsonl")
                  .read_text().splitlines()] for k in (1, 2)}
    assert {r["group"] for r in rounds[1]} == {0} and {r["group"] for r in rounds[2]} == {0, 1}
