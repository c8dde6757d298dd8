"""`steer_jax.run(config)`: a YAML run config -> traces, graded answers, the bill, files on disk.

Everything a config can get wrong is checked before any model is loaded or compiled: the YAML
itself, unknown keys (named), value ranges, checkpoint directories, tokenizers that differ between
the two models, prompts longer than the context.

A run survives preemption at two grains: every finished wave is kept (out/waves/wave_*.json), and
with `checkpoint_every` the wave in flight is saved every K rounds
(out/waves/rounds_<wave>/round_<r>/: with orbax, or by each process itself in a multi-process run);
`resume` continues from both, to the same traces. A SIGTERM (a preempted VM, `scancel`, a pod
being deleted) is not fatal inside `run`: the round in flight finishes, is saved whatever
`checkpoint_every` says, and `run` raises `Preempted`; a second SIGTERM ends the process at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from steer_jax.decoding.generate import check_prompts
from steer_jax.distributed import cache_shardings, mesh_of
from steer_jax.modeling.loading import load_model, load_tokenizer, read_config
from steer_jax.modeling.transformer import KVCache
from steer_jax.routing.gmm import GMMParams
from steer_jax.steer import (Fit, RoundMixture, RoundState, Step, SteerOptions, SteerResult,
                             Trace, TraceState, steer)

log = logging.getLogger(__name__)

# The config schema: section -> allowed keys (None: a scalar top-level key).
SCHEMA: dict[str, tuple[str, ...] | None] = {
    "small": None, "large": None, "method": None, "dtype": None, "scan_layers": None,
    "benchmark": ("name", "path", "offset", "limit"),
    "sampling": ("temperature", "top_p", "seed"),
    "steer": ("gamma", "max_steps", "max_step_tokens", "max_new_tokens", "delimiter",
              "confidence", "aggregate", "source", "groups", "refine", "policy", "percentile",
              "threshold"),
    "batch": ("size",),
    "specreason": ("threshold",),
    "rsd": ("prm", "threshold"),
    "router": ("path", "train"),
    "mesh": ("data", "model"),
    "distributed": ("coordinator", "num_processes", "process_id", "auto"),
}
DEFAULTS: dict[str, Any] = {
    "method": "steer", "dtype": "bfloat16", "scan_layers": None,
    "benchmark": {"path": None, "offset": 0, "limit": None},
    "sampling": {"temperature": 0.7, "top_p": 1.0, "seed": 0},
    "steer": {}, "batch": {"size": None},
    "specreason": {"threshold": 7}, "rsd": {"prm": None, "threshold": 0.7},
    "router": {"path": None, "train": None},
    "mesh": {},
    "distributed": {},
}
FLOP_UNIT = 1e12  # the paper reports FLOPs per query in units of 1e12


class RunConfigError(ValueError):
    """A run config that cannot run; the message says what to fix."""


class Preempted(Exception):
    """A SIGTERM stopped the run after saving its round in flight; `resume` continues it."""


@contextlib.contextmanager
def _sigterm_finishes_the_round(enabled: bool = True):
    """Within, the first SIGTERM only sets the yielded event, which the round hook reads.

    A preemption notice leaves seconds to tens of seconds: enough to finish a round and save
    it, not to recompute the rounds since the last periodic checkpoint. Signals reach only the
    main thread; elsewhere (a notebook's worker thread) the event is never set.
    """
    stop = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # one installed outside Python

    def on_sigterm(signum: int, frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGTERM, previous)  # a second SIGTERM is not asked twice

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclasses.dataclass(frozen=True)
class Summary:
    method: str
    benchmark: str
    n: int
    accuracy: float
    flops_per_query: float  # 1e12 units: 2N per generated token, discarded drafts included
    prefill_flops_per_query: float  # 2N per read token: prompts and catch-up reads
    executed_flops_per_query: float  # 2N per row x position computed, padding included
    a_per_f: float
    large_step_fraction: float
    wall_s: float
    params: dict[str, int]
    gamma: float | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where it ran: platform, processes and each process's mesh. Sharded sums round differently,
    # so confidences (never tokens or routing, in the tests) differ in the last bits by layout.
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML config (safe_load) and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise RunConfigError(f"{path} is not readable YAML: {e}") from e
    if not isinstance(config, dict):
        raise RunConfigError(f"{path} must hold a mapping of config keys")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RunConfigError(f"override {item!r} is not of the form key=value")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"override {item!r}: {p} is not a section")
        node[leaf] = yaml.safe_load(value)
    return config


def validate(config: dict[str, Any]) -> tuple[dict[str, Any], SteerOptions]:
    """Defaults filled in, every key and value checked; the STEER options built from it."""
    unknown = [k for k in config if k not in SCHEMA]
    for section, keys in SCHEMA.items():
        value = config.get(section)
        if keys is not None and value is not None:
            if not isinstance(value, dict):
                raise RunConfigError(f"config section {section!r} must be a mapping")
            unknown += [f"{section}.{k}" for k in value if k not in keys]
    if unknown:
        raise RunConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for k, v in config.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    for key in ("small", "large"):
        if not cfg.get(key):
            raise RunConfigError(f"config key {key!r} (a local checkpoint directory) is missing")
    if not cfg["benchmark"].get("name"):
        raise RunConfigError("config key 'benchmark.name' is missing")
    if not (cfg["scan_layers"] is None or isinstance(cfg["scan_layers"], bool)):
        raise RunConfigError("scan_layers must be true, false or null (null: unrolled except on "
                             f"TPUs), got {cfg['scan_layers']!r}")
    size = cfg["batch"]["size"]
    if size is not None and (not isinstance(size, int) or size < 1):
        raise RunConfigError(f"batch.size must be a positive integer or null, got {size!r}")
    try:
        opts = SteerOptions(method=cfg["method"], **cfg["steer"], **cfg["sampling"],
                            judge_threshold=cfg["specreason"]["threshold"],
                            prm_threshold=cfg["rsd"]["threshold"])
    except (TypeError, ValueError) as e:
        raise RunConfigError(str(e)) from e
    if opts.method == "rsd" and not cfg["rsd"]["prm"]:
        raise RunConfigError("method 'rsd' needs rsd.prm, a local process reward model directory")
    if opts.method == "query_router" and not cfg["router"]["path"]:
        raise RunConfigError("method 'query_router' needs router.path (made by "
                             "`steer-jax train-router`)")
    return cfg, opts


def load_models(cfg: dict[str, Any], mesh: Any = None) -> tuple[Any, Any]:
    """A validated config's small and large models, as its `dtype` and `scan_layers` say."""
    return tuple(load_model(cfg[k], cfg["dtype"], scan_layers=cfg["scan_layers"], mesh=mesh)
                 for k in ("small", "large"))


def examples_of(spec: dict[str, Any]) -> list:
    """A benchmark slice: `limit` examples from `offset` on (so train and test can split a file)."""
    from steer_jax.eval import load_benchmark

    offset, limit = spec.get("offset") or 0, spec.get("limit")
    examples = load_benchmark(spec["name"], spec.get("path"))[offset:]
    return examples if limit is None else examples[:limit]


def check_tokenizers(small: Any, large: Any, small_path: str, large_path: str) -> None:
    """STEER passes token ids between the models: their vocabularies must be the same."""
    a, b = small.get_vocab(), large.get_vocab()
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()))[:3]
        raise RunConfigError(f"the tokenizers of {small_path} and {large_path} differ "
                             f"({len(a)} vs {len(b)} tokens; e.g. {diff}): STEER needs one "
                             "vocabulary")


def _write_atomic(path: Path, text: str) -> None:
    """A crash never leaves a half-written file: write aside, then rename over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(result: SteerResult, correct: list[bool], opts: SteerOptions, benchmark: str,
              wall_s: float) -> Summary:
    n = len(result.traces)
    two_n = {k: 2 * v for k, v in result.params.items()}
    gen = sum(two_n["small"] * (t.generated["small"] + t.discarded)
              + two_n["large"] * t.generated["large"] for t in result.traces)
    # Reads: prompts, catch-up, judge prompts, and the PRM's reads when there is one.
    pre = sum(two_n[m] * t.read.get(m, 0) for t in result.traces for m in two_n)
    executed = sum(two_n[m] * result.executed_tokens[m] for m in two_n)
    steps = [s for t in result.traces for s in t.steps]
    acc = sum(correct) / max(n, 1)
    flops = gen / max(n, 1) / FLOP_UNIT
    return Summary(
        method=opts.method, benchmark=benchmark, n=n, accuracy=acc, flops_per_query=flops,
        prefill_flops_per_query=pre / max(n, 1) / FLOP_UNIT,
        executed_flops_per_query=executed / max(n, 1) / FLOP_UNIT,
        a_per_f=100 * acc / flops if flops > 0 else math.nan,  # accuracy points per 1e12
        large_step_fraction=sum(s.model == "large" for s in steps) / max(len(steps), 1),
        wall_s=wall_s, params=result.params,
        gamma=opts.gamma if opts.method == "steer" else None,
        options=dataclasses.asdict(opts))


def device_memory() -> int:
    """Bytes one device can hold: the accelerator's limit, or half the host's free memory."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def auto_batch_size(models: Sequence[Any], prompt_len: int, max_new_tokens: int,
                    memory: int | None = None) -> int:
    """How many traces fit at once: every model keeps a KV cache row per trace of the longest
    prompt plus the whole token budget, beside all the weights (90% of memory, for activations
    and the logits of a step).

    Per device: on a mesh a device holds its shard of each weight and of each cache, as the
    partition rules lay them out (`distributed.cache_shardings`); one trace more per 'data' slice
    is the unit, so the count is a multiple of the 'data' size and the traces split evenly.
    """
    memory = device_memory() if memory is None else memory
    slots = prompt_len + max_new_tokens
    mesh = mesh_of(models[0].params)
    data = 1 if mesh is None else mesh.shape["data"]
    # The largest shard of each weight: what the most loaded device holds.
    weights = sum(max((sh.data.nbytes for sh in getattr(x, "addressable_shards", ())),
                      default=x.nbytes) for m in models for x in jax.tree.leaves(m.params))

    def cache_bytes(m: Any) -> int:
        """One device's bytes of a cache of one trace per 'data' slice."""
        cache = jax.eval_shape(lambda: KVCache.init(m.config, data, slots, m.dtype))
        placed = None if mesh is None else cache_shardings(cache, mesh)
        total = 0
        for f in ("k", "v"):
            x = getattr(cache, f)
            shape = x.shape if placed is None else getattr(placed, f).shard_shape(x.shape)
            total += math.prod(shape) * x.dtype.itemsize
        return total

    per_trace = sum(cache_bytes(m) for m in models)
    fits = int((0.9 * memory - weights) // per_trace) * data
    if fits < 1:
        raise RunConfigError(f"not even one trace fits: on one device weights take "
                             f"{weights / 2**30:.1f} GiB and a trace's caches "
                             f"{per_trace / 2**30:.2f} GiB of {memory / 2**30:.1f} GiB; lower "
                             "steer.max_new_tokens or shard the models over a (larger) mesh")
    return fits


def _smallest(n_proc: int, value: int) -> int:
    """The smallest of every process's `value`, in every process: each host sizes its batch
    from its own memory (a CPU host's free memory differs from its neighbour's), but the waves
    must be cut alike everywhere."""
    if n_proc == 1:
        return value
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(value))))


def _barrier(n_proc: int, name: str) -> None:
    if n_proc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _merge(results: list[SteerResult]) -> SteerResult:
    executed = {m: sum(r.executed_tokens[m] for r in results) for m in results[0].executed_tokens}
    return SteerResult([t for r in results for t in r.traces],
                       [m for r in results for m in r.mixtures], executed, results[0].params)


def _config_changes(before: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The top-level config keys whose values differ from a checkpoint's (as JSON sees them).

    `distributed` is left out: which processes share the waves, and where they meet, changes no
    trace, and a pod relaunched after preemption may well meet at another address.
    """
    now = json.loads(json.dumps(cfg))
    keys = (set(before) | set(now)) - {"distributed"}
    return sorted(k for k in keys if before.get(k) != now.get(k))


def _wave_to_json(result: SteerResult, wall_s: float) -> str:
    return json.dumps({"result": dataclasses.asdict(result), "wall_s": wall_s})


def _wave_from_json(text: str) -> tuple[SteerResult, float]:
    d = json.loads(text)
    r = d["result"]
    traces = [Trace(**{**t, "steps": [Step(**s) for s in t["steps"]]}) for t in r["traces"]]
    mixtures = [RoundMixture(**m) for m in r["mixtures"]]
    return SteerResult(traces, mixtures, r["executed_tokens"], r["params"]), d["wall_s"]


_BATCH_SIZE = "batch_size"  # out/waves/: the size batch.size null resolved to


class _Waves:
    """Finished waves on disk (out/waves/): a killed run loses at most the wave it was in.

    Each wave is written atomically once complete, beside the config it was run with; `resume`
    reads them back instead of recomputing. Trace ids are global and seed the sampling, so a
    resumed run writes exactly the traces an uninterrupted one would.
    """

    def __init__(self, out: Path | None, cfg: dict[str, Any], resume: bool):
        self.dir = None if out is None else Path(out) / "waves"
        if self.dir is None or jax.process_index() != 0:  # process 0 sets the folder up
            return
        stamp = self.dir / "config.json"
        if resume and stamp.is_file():
            changed = _config_changes(json.loads(stamp.read_text()), cfg)
            if changed:
                raise RunConfigError(f"cannot resume {out}: the config changed since its "
                                     f"checkpoint ({', '.join(changed)})")
        else:
            if self.dir.exists():  # a fresh run: earlier waves are of another run
                for f in [*self.dir.glob("wave_*.json"), *self.dir.glob(_BATCH_SIZE)]:
                    f.unlink()
                for d in self.dir.glob("rounds_*"):
                    shutil.rmtree(d)
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(stamp, json.dumps(cfg, sort_keys=True))

    def _path(self, w: int) -> Path:
        return self.dir / f"wave_{w:05d}.json"

    def batch_size(self) -> int | None:
        """The batch.size the saved waves were cut with, when it was chosen from memory."""
        path = None if self.dir is None else self.dir / _BATCH_SIZE
        return None if path is None or not path.is_file() else int(path.read_text())

    def save_batch_size(self, size: int) -> None:
        if self.dir is not None and jax.process_index() == 0:
            _write_atomic(self.dir / _BATCH_SIZE, str(size))

    def load(self, w: int) -> tuple[SteerResult, float] | None:
        if self.dir is None or not self._path(w).is_file():
            return None
        return _wave_from_json(self._path(w).read_text())

    def save(self, w: int, result: SteerResult, wall_s: float) -> None:
        if self.dir is not None:
            _write_atomic(self._path(w), _wave_to_json(result, wall_s))


_ROUND_FORMAT = "steer_jax.round_checkpoint"
_ROUND_DIR = re.compile(r"round_\d{5}")
# A multi-process run's rounds (see `_RoundCheckpoint._save_on_host`): arrays, then the JSON.
_HOST_ARRAYS, _HOST_META = "arrays.npz", "meta.json"


def _fields(x: Any) -> dict[str, Any]:
    return {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}


class _RoundCheckpoint:
    """The wave in flight, saved every `every` rounds as out/waves/rounds_<wave>/round_<r>/.

    Each save is one orbax directory: the arrays (trace state, every cache, the routing mixture,
    the fits so far) and a JSON item saying which config, wave and round they belong to. Orbax
    writes into a temporary sibling and renames it into place only when complete, so a save
    killed halfway leaves nothing that `latest` would read. The newest two are kept: should the
    newest still be unreadable (a damaged copy, a full disk), the one before it is used.

    In a multi-process run each process saves the wave it runs by itself, without orbax (see
    `_save_on_host`), and each wave has its own directory, so no two processes write one.
    """

    def __init__(self, waves: Path, wave: int, trace_ids: range, every: int | None,
                 cfg: dict[str, Any], mesh: Mesh | None, stop: threading.Event | None = None):
        self.dir = (waves / f"rounds_{wave:05d}").absolute()  # orbax requires absolute paths
        self.every, self.mesh, self.stop = every, mesh, stop
        self.meta = {"format": _ROUND_FORMAT, "wave": wave,
                     "trace_ids": [trace_ids.start, trace_ids.stop],
                     "config": json.loads(json.dumps(cfg))}
        # The wave's wall-clock before a restart, so that a resumed run bills all of it.
        self.wall_before, self._started = 0.0, time.perf_counter()

    def _checkpointer(self) -> ocp.Checkpointer:
        return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
            state=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))

    def __call__(self, state: RoundState) -> None:
        """steer's `on_round` hook: save every `every` rounds, and stop after saving once
        `stop` is set."""
        stopping = self.stop is not None and self.stop.is_set()
        if not stopping and (not self.every or state.round % self.every):
            return
        routing = state.routing
        routing = [] if routing is None else [routing] if isinstance(routing, GMMParams) \
            else list(routing)
        arrays = {"trace": _fields(state.trace), "caches": [_fields(c) for c in state.caches],
                  "routing": [_fields(p) for p in routing],
                  # The fits only feed rounds.jsonl at the end: they wait on the host.
                  "fits": [{"params": jax.tree.map(np.asarray, _fields(f.params)),
                            "conf": np.asarray(f.conf), "among": np.asarray(f.among)}
                           for f in state.fits]}
        kind = "none" if state.routing is None else "one" \
            if isinstance(state.routing, GMMParams) else "per_writer"
        meta = {**self.meta, "round": state.round, "routing": kind,
                "fits": [[f.round, f.who] for f in state.fits],
                "wall_s": self.wall_before + time.perf_counter() - self._started}
        # Synchronous: the next round donates the caches these arrays are.
        path = self.dir / f"round_{state.round:05d}"
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
            raise Preempted(f"stopped by SIGTERM after round {state.round} of wave "
                            f"{self.meta['wave'] + 1}, saved in {path}; run again with resume "
                            "to continue")

    @staticmethod
    def _save_on_host(path: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """One process's round, written by that process alone.

        Orbax cannot: with several processes it refuses a jax.Array that one process holds whole
        (which is every array here: each process runs its waves on its own devices), and writes
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

    def latest(self) -> RoundState | None:
        """The newest readable round of this wave, or None when there is none."""
        for path in self._complete():
            try:
                return self._restore(path)
            except RunConfigError:
                raise
            except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
                # unreadable: an older one
                log.warning("round checkpoint %s is unreadable, trying an older one: %s", path, e)
        return None

    def clear(self) -> None:
        """The wave is finished and kept whole: its rounds are no longer needed."""
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
        changed = _config_changes(meta["config"], self.meta["config"])
        if changed:
            raise RunConfigError(f"cannot resume from {path}: the config changed since it was "
                                 f"saved ({', '.join(changed)})")
        if [meta["wave"], meta["trace_ids"]] != [self.meta["wave"], self.meta["trace_ids"]]:
            raise RunConfigError(f"cannot resume from {path}: it holds wave {meta['wave']} "
                                 f"(traces {meta['trace_ids']}), this is wave "
                                 f"{self.meta['wave']} (traces {self.meta['trace_ids']})")
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
        a = {**a, **jax.tree.map(on_device, {k: a[k] for k in ("trace", "caches", "routing")})}
        kind, routing = meta["routing"], [GMMParams(**p) for p in a["routing"]]
        self.wall_before = meta["wall_s"]
        return RoundState(
            round=meta["round"], trace=TraceState(**a["trace"]),
            caches=tuple(KVCache(**c) for c in a["caches"]),
            routing=None if kind == "none" else routing[0] if kind == "one" else tuple(routing),
            fits=tuple(Fit(r, who, GMMParams(**f["params"]), f["conf"], f["among"])
                       for (r, who), f in zip(meta["fits"], a["fits"])))

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


def run(config: dict[str, Any], out: str | Path | None = None, *, models: tuple | None = None,
        progress: Callable[[int, int, str], None] | None = None,
        resume: bool = False, checkpoint_every: int | None = None) -> Summary | None:
    """Run one config end to end; with `out`, write summary.json, traces.jsonl and rounds.jsonl.

    With a `distributed` section, every process runs its share of the waves and process 0
    writes the outputs and returns the summary (the others return None).

    `models` may pass already loaded (small, large, tokenizer) to reuse them across a sweep.
    `progress(done, total, message)` hears of every round of every wave. Every finished wave is
    kept under out/waves/; with `checkpoint_every=K` the wave in flight is also saved every K
    rounds. `resume=True` continues a killed run from both, to the traces an uninterrupted run
    writes. With `out`, a SIGTERM makes the run save its round in flight and raise `Preempted`.
    """
    from steer_jax.eval import extract_answer, grade, render_prompt

    cfg, opts = validate(config)
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
                or checkpoint_every < 1:
            raise RunConfigError(f"checkpoint_every must be a positive number of rounds, got "
                                 f"{checkpoint_every!r}")
        if out is None:
            raise RunConfigError("checkpoint_every needs an output directory to save rounds in")
    if cfg["distributed"]:
        from steer_jax.distributed import initialize

        if out is None:
            raise RunConfigError("a multi-process run needs an output directory that every "
                                 "process can reach")
        initialize(cfg)  # before anything touches a device
    configs = (read_config(cfg["small"]), read_config(cfg["large"]))  # fail fast on bad dirs
    if models is None:
        tokenizer, tok_large = load_tokenizer(cfg["small"]), load_tokenizer(cfg["large"])
        check_tokenizers(tokenizer, tok_large, cfg["small"], cfg["large"])
    else:
        tokenizer = models[2]
    bench = cfg["benchmark"]
    examples = examples_of(bench)
    prompts = [tokenizer(render_prompt(tokenizer, ex, bench["name"]),
                         add_special_tokens=False)["input_ids"] for ex in examples]
    try:
        check_prompts(prompts, min(c.vocab_size for c in configs),
                      min(c.max_position_embeddings for c in configs), opts.max_new_tokens)
    except ValueError as e:
        raise RunConfigError(f"{bench['name']}: {e}") from e
    mesh = None
    if cfg["mesh"]:  # weights over a ('data', 'model') mesh of this host's devices
        from steer_jax.distributed import mesh_from_config, shard_model

        mesh = mesh_from_config(cfg)
    if models is None:  # read shard by shard when there is a mesh
        small, large = load_models(cfg, mesh)
    else:
        small, large = models[0], models[1]
        if mesh is not None:
            small, large = shard_model(small, mesh), shard_model(large, mesh)
    extra: dict[str, Any] = {}
    if opts.method == "rsd":
        extra["prm"] = load_model(cfg["rsd"]["prm"], cfg["dtype"], value_head=True,
                                  scan_layers=cfg["scan_layers"], mesh=mesh)
        check_tokenizers(tokenizer, load_tokenizer(cfg["rsd"]["prm"]), cfg["small"],
                         cfg["rsd"]["prm"])
    if opts.method == "query_router":
        from steer_jax.baselines.query_router import load_router, prompt_features, route

        router = load_router(cfg["router"]["path"])
        extra["route_queries"] = route(router, prompt_features(small, prompts)).tolist()
    done = _Waves(out, cfg, resume)
    # Several processes split the waves (w % count); whole waves keep each wave's mixture groups,
    # and so every trace, what one process would compute. They meet through out/waves/.
    n_proc, me = jax.process_count(), jax.process_index()
    _barrier(n_proc, "steer-jax: waves folder ready")
    size = cfg["batch"]["size"]
    if size is None:
        # A resumed run cuts its waves as the saved ones were cut, whatever memory says now.
        size = done.batch_size() if resume else None
        if size is None:
            verifiers = [extra["prm"]] if "prm" in extra else []
            size = _smallest(n_proc, auto_batch_size([small, large, *verifiers],
                                                     max(map(len, prompts)), opts.max_new_tokens))
            done.save_batch_size(size)
            if progress:
                progress(0, 1, f"batch.size {size}: what fits in device memory")
    size = min(size, len(prompts))
    n_waves = -(-len(prompts) // size)
    waves, wall = [], 0.0
    # Without an output folder there is nowhere to save a round: a SIGTERM ends the run as usual.
    with _sigterm_finishes_the_round(enabled=done.dir is not None) as stop:
        for w, lo in enumerate(range(0, len(prompts), size)):
            saved = done.load(w)
            if saved is not None:
                waves.append(saved[0])
                wall += saved[1]
                continue
            if w % n_proc != me:
                continue
            start = time.perf_counter()
            hi = min(lo + size, len(prompts))
            wave_extra = {k: (v[lo:hi] if k == "route_queries" else v) for k, v in extra.items()}
            rounds = None
            if done.dir is not None:
                rounds = _RoundCheckpoint(done.dir, w, range(lo, hi), checkpoint_every, cfg,
                                          mesh_of(small.params), stop)
            resume_from = rounds.latest() if rounds is not None and resume else None
            report = None
            if progress:
                def report(rnd: int, running: int, w: int = w) -> None:
                    progress(w * opts.max_steps + rnd, n_waves * opts.max_steps,
                             f"{opts.method}: wave {w + 1}/{n_waves}, round {rnd}, "
                             f"{running} traces running")
            waves.append(steer(small, large, tokenizer, prompts[lo:hi], opts,
                               trace_ids=range(lo, hi), progress=report, on_round=rounds,
                               resume_from=resume_from, **wave_extra))
            wave_wall = time.perf_counter() - start + (rounds.wall_before if rounds else 0.0)
            wall += wave_wall
            done.save(w, waves[-1], wave_wall)
            if rounds is not None:
                rounds.clear()
            if progress:
                progress((w + 1) * opts.max_steps, n_waves * opts.max_steps,
                         f"{opts.method}: wave {w + 1}/{n_waves} done")
    if n_proc > 1:
        _barrier(n_proc, "steer-jax: all waves written")
        if me != 0:
            return None  # process 0 gathers and writes
        waves, wall = zip(*(done.load(w) for w in range(n_waves)))
        waves, wall = list(waves), sum(wall)
    result = _merge(waves)
    answers = [extract_answer(bench["name"], t.output) for t in result.traces]
    correct = [grade(bench["name"], t.output, ex) for t, ex in zip(result.traces, examples)]
    summary = dataclasses.replace(
        summarize(result, correct, opts, bench["name"], wall),
        layout={"platform": jax.default_backend(), "processes": n_proc,
                "mesh": None if mesh is None else dict(mesh.shape)})
    if out is not None:
        write_run(Path(out), summary, result, examples, answers, correct)
    return summary


def write_run(out: Path, summary: Summary, result: SteerResult, examples: list, answers: list,
              correct: list[bool]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({
        "id": ex.id, "output": t.output, "answer": a, "reference": ex.reference, "correct": c,
        "meta": ex.meta, "stop": t.stop, "generated": t.generated, "discarded": t.discarded,
        "read": t.read, "steps": [dataclasses.asdict(s) for s in t.steps]})
        for t, ex, a, c in zip(result.traces, examples, answers, correct)]
    _write_atomic(out / "traces.jsonl", "\n".join(lines) + "\n")
    _write_atomic(out / "rounds.jsonl", "".join(json.dumps(dataclasses.asdict(m)) + "\n"
                                                for m in result.mixtures))
    # The summary last: its presence marks a complete run.
    _write_atomic(out / "summary.json", json.dumps(dataclasses.asdict(summary), indent=2) + "\n")


def sweep(config: dict[str, Any], gammas: Sequence[float], out: str | Path,
          progress: Callable[[int, int, str], None] | None = None, *, resume: bool = False,
          checkpoint_every: int | None = None) -> list[Summary]:
    """STEER at each gamma (models loaded once); one run directory per value and a table.

    `resume` and `checkpoint_every` are `run`'s, for each value: a resumed sweep reads the
    values it finished back from their waves and continues the one it was in.
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
    _write_atomic(out / "sweep.md", "\n".join(rows) + "\n")
    return summaries


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
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        run(config, d, models=models, progress=progress)
        lines = (Path(d) / "traces.jsonl").read_text().splitlines()
    return [json.loads(x)["correct"] for x in lines]
