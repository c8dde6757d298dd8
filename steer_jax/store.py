"""A run's checkpoint store: the rounds of the part in flight (finished parts: parts.py).

A run survives preemption at three grains: every process's finished part is kept
(out/parts/part_<p>.json); with `checkpoint_every` its rounds are saved every K rounds
(out/parts/rounds_<p>/round_<r>/: with orbax, or by each process itself in a multi-process run);
and a SIGTERM saves the round in flight after the call in flight
(round_<r>_phase<i>_call<c>/: round r in flight, its phase i, c calls made). The processes of
one run fit every round's mixture together, so they stop and resume at the same point: a
resumed run continues from the newest point that every process has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from steer_jax.calls import TraceState
from steer_jax.distributed import Peers
from steer_jax.modeling.kv_cache import KVCache
from steer_jax.parts import config_changes
from steer_jax.round_state import Fit, RoundProgress, RoundState
from steer_jax.routing.gmm import GMMParams
from steer_jax.run_config import RunConfigError

log = logging.getLogger(__name__)


class Preempted(Exception):
    """A SIGTERM stopped the run after saving its state inside the round in flight; `resume`
    continues it."""


_ROUND_FORMAT = "steer_jax.round_checkpoint"
# round_<r>: after r rounds; round_<r>_phase<i>_call<c>: inside round r (see `_position`).
_ROUND_DIR = re.compile(r"round_(\d{5})(?:_phase(\d)_call(\d{5}))?")
# A multi-process run's rounds (see `RoundCheckpoint._save_on_host`): arrays, then the JSON.
_HOST_ARRAYS, _HOST_META = "arrays.npz", "meta.json"


def _fields(x: Any) -> dict[str, Any]:
    return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}


# RoundProgress's host-side fields, kept in the JSON item; the rest are arrays.
_PROGRESS_STATIC = ("phase", "calls", "shared")


def _dir_name(state: RoundState) -> str:
    w = state.within
    return f"round_{state.round:05d}" + ("" if w is None else f"_phase{w.phase}_call{w.calls:05d}")


def _position(name: str) -> tuple[int, int]:
    """Where a saved state stands, in an order every process shares: (round, stage), stage 0
    before the round's first call and 1 + i inside its phase i. The calls are left out: each
    process makes its own number of them, and processes stop together only between phases."""
    m = _ROUND_DIR.fullmatch(name)
    return int(m[1]), 0 if m[2] is None else 1 + int(m[2])


def _code(position: tuple[int, int]) -> int:
    """A position as one integer (`Peers.smallest` compares integers)."""
    return position[0] * 16 + position[1]


class RoundCheckpoint:
    """A process's part in flight, saved every `every` rounds as out/parts/rounds_<p>/round_<r>/.

    Each save is one orbax directory: the arrays (trace state, every cache, the routing mixture,
    the fits so far) and a JSON item saying which config, part and round they belong to. Orbax
    writes into a temporary sibling and renames it into place only when complete, so a save
    killed halfway leaves nothing that `latest` would read. The newest two are kept: should the
    newest still be unreadable (a damaged copy, a full disk), the one before it is used.

    In a multi-process run each process saves its part by itself, without orbax (see
    `_save_on_host`), and each part has its own directory, so no two processes write one.

    A SIGTERM (`stop`) saves the state inside the round in flight, as steer's `on_call` hands it
    over. One process stops after the call in flight. Several stop together, so the stop is
    decided collectively (`peers`) at a point each of them reaches: between two phases of the
    round (each process makes its own number of calls, so "after call c" is no such point).
    Only a stop saves inside a round: a state holds every page pool, far too much to write
    after every call.
    """

    def __init__(self, parts: Path, part: int, trace_ids: range, every: int | None,
                 cfg: dict[str, Any], mesh: Mesh | None, stop: threading.Event | None = None,
                 peers: Peers | None = None):
        self.dir = (parts / f"rounds_{part:05d}").absolute()  # orbax requires absolute paths
        self.every, self.mesh, self.stop = every, mesh, stop
        self.peers = peers or Peers()
        self.meta = {"format": _ROUND_FORMAT, "part": part,
                     "trace_ids": [trace_ids.start, trace_ids.stop],
                     "config": json.loads(json.dumps(cfg))}
        # The part's wall-clock before a restart, so that a resumed run bills all of it.
        self.wall_before, self._started = 0.0, time.perf_counter()

    def _checkpointer(self) -> ocp.Checkpointer:
        return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))

    def __call__(self, state: RoundState) -> None:
        """steer's `on_round` and `on_call` hook: save every `every` rounds, and stop after
        saving once `stop` is set."""
        inside = state.within is not None
        if inside and not state.within.shared and len(self.peers.sizes) > 1:
            return  # not a point every process reaches (see the class docstring)
        # Every process stops at the same point: they fit every mixture together.
        stopping = self.peers.any(self.stop is not None and self.stop.is_set())
        if not stopping and (inside or not self.every or state.round % self.every):
            return
        routing = state.routing
        routing = [] if routing is None else [routing] if isinstance(routing, GMMParams) \
            else list(routing)
        # A cache without a sliding layers' pool leaves those fields out (KVCache's defaults).
        arrays = {"trace": _fields(state.trace),
                  "caches": [{k: x for k, x in _fields(c).items() if x is not None}
                             for c in state.caches],
                  "routing": [_fields(p) for p in routing],
                  # The fits only feed rounds.jsonl at the end: they wait on the host.
                  "fits": [{"params": jax.tree.map(np.asarray, _fields(f.params)),
                            "conf": np.asarray(f.conf), "among": np.asarray(f.among),
                            **({} if f.kept_from is None
                               else {"kept_from": np.asarray(f.kept_from)})}
                           for f in state.fits]}
        within = None
        if inside:
            progress = _fields(state.within)
            within = {k: progress.pop(k) for k in _PROGRESS_STATIC}
            arrays["within"] = progress
        kind = "none" if state.routing is None else "one" \
            if isinstance(state.routing, GMMParams) else "per_writer"
        meta = {**self.meta, "round": state.round, "routing": kind, "within": within,
                "fits": [[f.round, f.who] for f in state.fits],
                "wall_s": self.wall_before + time.perf_counter() - self._started,
                "routing_s": state.routing_s}
        # Synchronous: the next call donates the caches these arrays are.
        path = self.dir / _dir_name(state)
        if jax.process_count() > 1:
            self._save_on_host(path, arrays, meta)
        else:
            with self._checkpointer() as checkpointer:
                checkpointer.save(path, force=True,
                                  args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                          meta=ocp.args.JsonSave(meta)))
        # Only this process writes here: anything else is older or a save killed halfway.
        keep = set(self._complete()[:2])
        for old in self.dir.iterdir():
            if old not in keep:
                shutil.rmtree(old)
        if stopping:
            where = f"round {state.round}" if not inside else \
                f"call {state.within.calls} of round {state.round + 1}"
            raise Preempted(f"stopped by SIGTERM after {where} of part {self.meta['part']}, "
                            f"saved in {path}; run again with resume to continue")

    @staticmethod
    def _save_on_host(path: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """One process's round, written by that process alone.

        Orbax cannot: with several processes it refuses a jax.Array that one process holds whole
        (which is every array here: each process runs its part on its own devices), and writes
        numpy arrays from process 0 only. So the arrays come to the host into one .npz, their
        tree, dtypes and mesh layouts into the JSON (npz keeps bfloat16 only as raw bytes), both
        in a temporary sibling that is renamed into place once flushed to disk: a kill at any
        point leaves either no round_<r> or a whole one.
        """
        leaves, _ = jax.tree.flatten(arrays)
        host = [np.asarray(x) for x in leaves]

        def layout(x: Any) -> dict[str, Any] | None:
            sharding = getattr(x, "sharding", None)
            if not isinstance(sharding, NamedSharding) or sharding.mesh.size == 1:
                return None
            return {"mesh": dict(sharding.mesh.shape),
                    "spec": [list(a) if isinstance(a, tuple) else a for a in sharding.spec]}

        meta = {**meta, "layout": jax.tree.map(lambda _: 0, arrays),
                "dtypes": [x.dtype.name for x in host], "shardings": [layout(x) for x in leaves]}
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed halfway
        tmp.mkdir(parents=True)
        for name, write in ((_HOST_ARRAYS, lambda f: np.savez(f, *host)),
                            (_HOST_META, lambda f: f.write(json.dumps(meta).encode()))):
            with open(tmp / name, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes the round count
        if path.exists():  # the same round again, after resuming from an older one
            shutil.rmtree(path)
        os.replace(tmp, path)

    @staticmethod
    def _read_host(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        with np.load(path / _HOST_ARRAYS) as npz:
            leaves = [npz[f"arr_{i}"].view(jnp.dtype(d)) for i, d in enumerate(meta["dtypes"])]
        return jax.tree.unflatten(jax.tree.structure(meta["layout"]), leaves)

    def _complete(self) -> list[Path]:
        """Finalized round checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        return sorted((p for p in self.dir.iterdir()
                       if _ROUND_DIR.fullmatch(p.name) and ocp.step.is_path_finalized(p)),
                      reverse=True)

    def _newest_readable(self, at_most: tuple[int, int] | None = None) -> RoundState | None:
        for path in self._complete():
            if at_most is not None and _position(path.name) > at_most:
                continue
            try:
                return self._restore(path)
            except RunConfigError:
                raise
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
                # unreadable: an older one
                log.warning("round checkpoint %s is unreadable, trying an older one: %s", path, e)
        return None

    def latest(self) -> RoundState | None:
        """The newest readable state of this part that every process has, or None.

        The processes save at the same points (rounds, or a stop between two phases), but a
        kill may land between two processes' saves of one: each finds its newest readable
        state, and all take the oldest of those.
        """
        newest = self._newest_readable()
        mine = None if newest is None else _position(_dir_name(newest))
        agreed = self.peers.smallest(-1 if mine is None else _code(mine))
        if agreed < 0:
            return None
        if _code(mine) != agreed:
            at_most = divmod(agreed, 16)
            newest = self._newest_readable(at_most=at_most)
            if newest is None or _code(_position(_dir_name(newest))) != agreed:
                raise RunConfigError(f"cannot resume: every process has round {at_most[0]} "
                                     f"(stage {at_most[1]}), but {self.dir} holds no readable "
                                     "copy of it")
        return newest

    def clear(self) -> None:
        """The run is finished and kept whole: its rounds are no longer needed."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _restore(self, path: Path) -> RoundState:
        host = (path / _HOST_META).is_file()
        if host:
            meta = json.loads((path / _HOST_META).read_text())
        else:
            checkpointer = self._checkpointer()
            meta = checkpointer.restore(path, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or meta.get("format") != _ROUND_FORMAT:
            raise ValueError(f"not a round checkpoint (metadata {meta!r})")
        changed = config_changes(meta["config"], self.meta["config"])
        if changed:
            raise RunConfigError(f"cannot resume from {path}: the config changed since it was "
                                 f"saved ({', '.join(changed)})")
        if [meta["part"], meta["trace_ids"]] != [self.meta["part"], self.meta["trace_ids"]]:
            raise RunConfigError(f"cannot resume from {path}: it holds part {meta['part']} "
                                 f"(traces {meta['trace_ids']}), this is part "
                                 f"{self.meta['part']} (traces {self.meta['trace_ids']})")
        if host:
            a = self._read_host(path, meta)
            # Sharded arrays go back to the layout they were saved in, as `_target` does.
            leaves, tree = jax.tree.flatten(a)
            placed = [x if at is None else jax.device_put(x, self._sharding(at["mesh"], at["spec"]))
                      for x, at in zip(leaves, meta.get("shardings") or [None] * len(leaves))]
            a = jax.tree.unflatten(tree, placed)
        else:
            tree = checkpointer.metadata(path).item_metadata["state"].tree
            target = jax.tree.map(self._target, tree,
                                  is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))
            a = checkpointer.restore(path, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))["state"]
        # Arrays of a one-device run come back through the host and go to the default device
        # uncommitted, as a fresh run's are, so the resumed rounds reuse its compiled programs.
        on_device = lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x  # noqa: E731
        a = {**a, **jax.tree.map(on_device, {k: a[k] for k in ("trace", "caches", "routing",
                                                                "within") if k in a})}
        kind, routing = meta["routing"], [GMMParams(**p) for p in a["routing"]]
        within = meta.get("within")  # absent in rounds saved before rounds could be stopped in
        self.wall_before = meta["wall_s"]
        return RoundState(
            round=meta["round"], trace=TraceState(**a["trace"]),
            caches=tuple(KVCache(**c) for c in a["caches"]),
            routing=None if kind == "none" else routing[0] if kind == "one" else tuple(routing),
            fits=tuple(Fit(r, who, GMMParams(**f["params"]), f["conf"], f["among"],
                           f.get("kept_from")) for (r, who), f in zip(meta["fits"], a["fits"])),
            within=None if within is None else RoundProgress(**a["within"], **within),
            routing_s=meta.get("routing_s", 0.0))

    def _target(self, leaf: Any) -> Any:
        """Where a saved array goes back to: the layout it was saved in, on this run's mesh
        (the same layout compiles the same programs, so the resumed rounds compute the same);
        the host for one-device arrays and the fits."""
        sharding = leaf.sharding
        if isinstance(sharding, ocp.metadata.NamedShardingMetadata):
            saved = dict(zip(sharding.axis_names, np.asarray(sharding.shape).tolist()))
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self._sharding(
                saved, sharding.partition_spec))
        return np.empty(leaf.shape, leaf.dtype)

    def _sharding(self, saved: dict[str, int], spec: Sequence[Any]) -> NamedSharding:
        """A saved array's layout on this run's mesh, which must have the saved mesh's shape."""
        if self.mesh is None or saved != dict(self.mesh.shape):
            raise RunConfigError(f"the round checkpoints in {self.dir} were saved on a mesh "
                                 f"{saved}; this run has "
                                 f"{dict(self.mesh.shape) if self.mesh else 'one device'}")
        return NamedSharding(self.mesh, PartitionSpec(
            *[tuple(a) if isinstance(a, list) else a for a in spec]))
