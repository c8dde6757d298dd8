"""A run's finished parts on disk (out/parts/part_<p>.json), one per process, and the config
they were run with: what `resume` reads back instead of recomputing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from steer_jax.results import RoundMixture, Step, SteerResult, Trace
from steer_jax.run_config import RunConfigError


def write_atomic(path: Path, text: str) -> None:
    """A crash never leaves a half-written file: write aside, then rename over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_changes(before: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The top-level config keys whose values differ from a checkpoint's (as JSON sees them).

    `distributed` is left out: where the processes meet changes no trace, and a pod relaunched
    after preemption may well meet at another address.
    """
    now = json.loads(json.dumps(cfg))
    keys = (set(before) | set(now)) - {"distributed"}
    return sorted(k for k in keys if before.get(k) != now.get(k))


def _part_to_json(result: SteerResult, wall_s: float) -> str:
    return json.dumps({"result": dataclasses.asdict(result), "wall_s": wall_s})


def _part_from_json(text: str) -> tuple[SteerResult, float]:
    d = json.loads(text)
    r = d["result"]
    traces = [Trace(**{**t, "steps": [Step(**s) for s in t["steps"]]}) for t in r["traces"]]
    mixtures = [RoundMixture(**m) for m in r["mixtures"]]
    return SteerResult(traces, mixtures, r["executed_tokens"], r["params"],
                       r.get("iterations", {}), r.get("routing_s", 0.0),
                       r.get("rounds", 0)), d["wall_s"]


_POOLS = "pools.json"  # out/parts/: the page pools cache.pages null resolved to


class Parts:
    """Finished parts of a run on disk (out/parts/): one per process, its slice of the traces.

    Each part is written atomically once complete, beside the config it was run with; `resume`
    reads them back instead of recomputing. Trace ids are global and seed the sampling, so a
    resumed run writes exactly the traces an uninterrupted one would.
    """

    def __init__(self, out: Path | None, cfg: dict[str, Any], resume: bool):
        self.dir = None if out is None else Path(out) / "parts"
        if self.dir is None or jax.process_index() != 0:  # process 0 sets the folder up
            return
        stamp = self.dir / "config.json"
        if resume and stamp.is_file():
            changed = config_changes(json.loads(stamp.read_text()), cfg)
            if changed:
                raise RunConfigError(f"cannot resume {out}: the config changed since its "
                                     f"checkpoint ({', '.join(changed)})")
        else:
            if self.dir.exists():  # a fresh run: earlier parts are of another run
                for f in [*self.dir.glob("part_*.json"), *self.dir.glob(_POOLS)]:
                    f.unlink()
                for d in self.dir.glob("rounds_*"):
                    shutil.rmtree(d)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(stamp, json.dumps(cfg, sort_keys=True))

    def _path(self, p: int) -> Path:
        return self.dir / f"part_{p:05d}.json"

    def pools(self) -> list[int | None] | None:
        """The page pools the saved rounds were run with, when they were sized from memory
        (a resumed run restores caches of those shapes, whatever memory says now)."""
        path = None if self.dir is None else self.dir / _POOLS
        return None if path is None or not path.is_file() else json.loads(path.read_text())

    def save_pools(self, pools: list[int | None]) -> None:
        if self.dir is not None and jax.process_index() == 0:
            write_atomic(self.dir / _POOLS, json.dumps(pools))

    def load(self, p: int) -> tuple[SteerResult, float] | None:
        if self.dir is None or not self._path(p).is_file():
            return None
        return _part_from_json(self._path(p).read_text())

    def save(self, p: int, result: SteerResult, wall_s: float) -> None:
        if self.dir is not None:
            write_atomic(self._path(p), _part_to_json(result, wall_s))
