"""`steer_jax.run(config)`: a YAML run config -> traces, graded answers, the bill, files on disk.

Everything a config can get wrong is checked before any model is loaded or compiled: the YAML
itself, unknown keys (named), value ranges, checkpoint directories, tokenizers that differ between
the two models, prompts longer than the context.

A run is one set of rounds over every trace of the benchmark (each process of a multi-process run
holds a slice of them and all fit each round's mixture together), decoded in calls of at most
`batch.size` traces over paged KV caches (`cache.page_size`, `cache.pages`).

A run survives preemption (steer_jax/store.py): every process's finished part is kept, and with
`checkpoint_every` the rounds in flight are saved every K rounds; `resume` continues from both, to
the same traces. A SIGTERM (a preempted VM, `scancel`, a pod being deleted) is not fatal inside
`run`: the call in flight finishes (in a multi-process run, the phase of the round in flight: see
`RoundCheckpoint`), the state inside the round is saved whatever `checkpoint_every` says, and
`run` raises `Preempted`; a second SIGTERM ends the process at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from steer_jax import memory
from steer_jax.decoding.generate import check_prompts
from steer_jax.distributed import Peers, mesh_of
from steer_jax.latency import per
from steer_jax.modeling.loading import load_model, load_tokenizer, read_config
from steer_jax.run_config import RunConfigError, check_tokenizers, examples_of, validate
from steer_jax.steer import SteerOptions, SteerResult, steer
from steer_jax.parts import Parts, write_atomic
from steer_jax.store import Preempted, RoundCheckpoint

__all__ = ["Preempted", "RunConfigError", "Summary", "load_models", "run", "summarize",
           "write_run"]

FLOP_UNIT = 1e12  # the paper reports FLOPs per query in units of 1e12


@contextlib.contextmanager
def _sigterm_finishes_the_round(enabled: bool = True):
    """Within, the first SIGTERM only sets the yielded event, which the checkpoint hook reads
    after every call (one process) or between two phases of a round (several).

    A preemption notice leaves seconds to tens of seconds: enough to finish a call and save,
    not always a whole round (hundreds of traces, many calls), nor to recompute the rounds
    since the last periodic checkpoint. Signals reach only the main thread; elsewhere (a
    notebook's worker thread) the event is never set.
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
    # Device seconds spent deciding who writes (latency.py), per query and per round (continuous:
    # per chunk boundary); 0.0 where nothing decides (small_only, large_only).
    routing_s_per_query: float = 0.0
    routing_s_per_round: float = 0.0
    gamma: float | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Where it ran: platform, processes and each process's mesh. Sharded sums round differently,
    # so confidences (never tokens or routing, in the tests) differ in the last bits by layout.
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)


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
        routing_s_per_query=per(result.routing_s, n),
        routing_s_per_round=per(result.routing_s, result.rounds),
        gamma=opts.gamma if opts.method == "steer" else None,
        options=dataclasses.asdict(opts))


def _barrier(n_proc: int, name: str) -> None:
    if n_proc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _merge(results: list[SteerResult]) -> SteerResult:
    """The processes' parts as one result: their traces in order, the bill summed; every part
    holds the same mixtures (fitted together over all traces), so the first part's are kept."""
    executed = {m: sum(r.executed_tokens[m] for r in results) for m in results[0].executed_tokens}
    # The processes step at once: the run's iterations are its busiest process's.
    iterations = {m: max(r.iterations.get(m, 0) for r in results) for m in executed}
    # Likewise they decide side by side (every one fits the same mixtures, and judges its own).
    return SteerResult([t for r in results for t in r.traces], results[0].mixtures, executed,
                       results[0].params, iterations, max(r.routing_s for r in results),
                       max(r.rounds for r in results))


def _all_parts(parts: Parts, n_proc: int) -> bool:
    """Whether every process's part is on disk (else all of them resume their rounds together:
    one that had finished still fits the mixtures with the others)."""
    return parts.dir is not None and all(parts.load(p) is not None for p in range(n_proc))


def pool_sizes(cfg: dict[str, Any], models: Sequence[Any],
               mesh: Any = None) -> list[int | tuple[int, int]]:
    """Pages in each model's pool: `cache.pages` for every pool, or what this process's devices
    hold beside the loaded weights (`memory.device_budget`, each byte counted once), split so
    that every pool holds as many traces (a model with sliding-window layers gets a pair:
    its global layers' pool, its sliding layers' pool). steer() clamps a pool to what its
    traces could ever use, so a small run on a large host allocates only that."""
    if cfg["cache"]["pages"] is not None:
        return [cfg["cache"]["pages"]] * len(models)
    devices = None if mesh is None else list(mesh.devices.flat)
    budget = memory.device_budget(devices=devices)
    shards = 1 if mesh is None else mesh.shape["model"]
    size = cfg["cache"]["page_size"]
    tokens = cfg["steer"].get("max_new_tokens", SteerOptions.max_new_tokens)
    pools = memory.pool_pages([m.config for m in models], models[0].dtype, budget, size, tokens,
                              shards)
    if min(memory.flat_pools(pools)) < 1:
        raise RunConfigError(
            f"no room for KV pages: on one device the weights leave {budget / 2**30:.2f} GiB of "
            "memory; shard the models over a (larger) mesh or use a device with more memory")
    return pools


def run(config: dict[str, Any], out: str | Path | None = None, *, models: tuple | None = None,
        progress: Callable[[int, int | None, str], None] | None = None,
        resume: bool = False, checkpoint_every: int | None = None) -> Summary | None:
    """Run one config end to end; with `out`, write summary.json, traces.jsonl and rounds.jsonl.

    With a `distributed` section, every process runs its slice of the traces, all of them fit
    each round's mixtures together, and process 0 writes the outputs and returns the summary
    (the others return None).

    `models` may pass already loaded (small, large, tokenizer) to reuse them across a sweep.
    `progress(done, total, message)` hears of every round. Every process's finished part is
    kept under out/parts/; with `checkpoint_every=K` its rounds are also saved every K rounds.
    `resume=True` continues a killed run from both, to the traces an uninterrupted run writes.
    With `out`, a SIGTERM makes the run save its state after the call in flight (inside its
    round) and raise `Preempted`.
    """
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
    tokenizer, examples, prompts = _inputs(cfg, opts, models)
    small, large, extra, mesh = _models(cfg, opts, models, tokenizer, prompts)
    if "prm" in extra:
        extra["prm_questions"] = [ex.question for ex in examples]
    parts = Parts(out, cfg, resume)
    n_proc, me = jax.process_count(), jax.process_index()
    _barrier(n_proc, "steer-jax: parts folder ready")
    saved = _steer_part(cfg, opts, parts, (small, large, tokenizer), extra, prompts, mesh,
                        resume=resume, checkpoint_every=checkpoint_every, progress=progress)
    _barrier(n_proc, "steer-jax: all parts written")
    if me != 0:
        return None  # process 0 gathers and writes
    done = [saved] + [parts.load(p) for p in range(1, n_proc)]
    result = _merge([r for r, _ in done])
    wall = max(w for _, w in done)  # the processes ran side by side
    if parts.dir is not None:
        for p in range(n_proc):
            RoundCheckpoint(parts.dir, p, range(0), None, cfg, None).clear()
    return _graded_summary(cfg, opts, result, examples, wall, mesh, out)


def load_models(cfg: dict[str, Any], mesh: Any = None) -> tuple[Any, Any]:
    """A validated config's small and large models, as its `dtype`, `scan_layers` and
    `cpu_kernels` say."""
    return tuple(load_model(cfg[k], cfg["dtype"], scan_layers=cfg["scan_layers"], mesh=mesh,
                            cpu_kernels=cfg["cpu_kernels"]) for k in ("small", "large"))


def _inputs(cfg: dict[str, Any], opts: SteerOptions, models: tuple | None
            ) -> tuple[Any, list, list[list[int]]]:
    """The tokenizer, the benchmark slice and its prompts, each checked against both models'
    configs (vocabulary, context) before any weight is read."""
    from steer_jax.eval import render_prompt

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
    return tokenizer, examples, prompts


def _models(cfg: dict[str, Any], opts: SteerOptions, models: tuple | None, tokenizer: Any,
            prompts: list[list[int]]) -> tuple[Any, Any, dict[str, Any], Any]:
    """The two models (read shard by shard when there is a mesh), what the method needs beside
    them (the PRM, the router's decisions), and the mesh."""
    mesh = None
    if cfg["mesh"]:  # weights over a ('data', 'model') mesh of this host's devices
        from steer_jax.distributed import mesh_from_config, shard_model

        mesh = mesh_from_config(cfg)
    if models is None:
        small, large = load_models(cfg, mesh)
    else:
        small, large = models[0], models[1]
        if mesh is not None:
            small, large = shard_model(small, mesh), shard_model(large, mesh)
    extra: dict[str, Any] = {}
    if opts.method == "rsd":
        extra["prm"] = load_model(cfg["rsd"]["prm"], cfg["dtype"], value_head=True,
                                  scan_layers=cfg["scan_layers"], mesh=mesh,
                                  cpu_kernels=cfg["cpu_kernels"])
        # A PRM of another vocabulary reads the questions and steps as text (prm_text).
        extra["prm_tokenizer"] = load_tokenizer(cfg["rsd"]["prm"])
    if opts.method == "query_router":
        from steer_jax.baselines.query_router import load_router, route_prompts

        decisions, extra["router_s"] = route_prompts(load_router(cfg["router"]["path"]), small,
                                                     prompts)
        extra["route_queries"] = decisions.tolist()
    return small, large, extra, mesh


def _steer_part(cfg: dict[str, Any], opts: SteerOptions, parts: Parts, models: tuple,
                extra: dict[str, Any], prompts: list[list[int]], mesh: Any, *, resume: bool,
                checkpoint_every: int | None, progress: Callable | None) -> tuple[SteerResult,
                                                                                  float]:
    """This process's slice of the traces, steered (or read back from its finished part): the
    result and its wall-clock, rounds before a resume included."""
    small, large, tokenizer = models
    # Each process holds a contiguous slice of the traces; they fit every mixture together.
    n_proc, me = jax.process_count(), jax.process_index()
    peers = Peers.of_run(len(prompts))
    lo, hi = peers.offset, peers.offset + peers.sizes[me]
    models_held = [small, large, *([extra["prm"]] if "prm" in extra else [])]
    # A resumed run restores caches of the saved shapes, whatever memory says now.
    pools = parts.pools() if resume else None
    if pools is None:
        pools = [tuple(peers.smallest(x) for x in p) if isinstance(p, tuple)
                 else peers.smallest(p) for p in pool_sizes(cfg, models_held, mesh)]
        parts.save_pools(pools)
        if progress:
            names = ", ".join(["small", "large", "prm"][: len(pools)])
            progress(0, opts.max_steps, f"KV page pools ({names}): {pools} pages of "
                     f"{cfg['cache']['page_size']} tokens")
    saved = parts.load(me)
    if saved is not None and _all_parts(parts, n_proc):
        return saved
    # Without an output folder there is nowhere to save a round: a SIGTERM ends the run as usual.
    with _sigterm_finishes_the_round(enabled=parts.dir is not None) as stop:
        start = time.perf_counter()
        rounds = None
        if parts.dir is not None:
            rounds = RoundCheckpoint(parts.dir, me, range(lo, hi), checkpoint_every, cfg,
                                     mesh_of(small.params), stop, peers)
        resume_from = rounds.latest() if rounds is not None and resume else None

        def report(rnd: int, running: int) -> None:
            if progress:  # continuous rounds are chunk boundaries: their count is open
                progress(rnd, opts.max_steps if opts.schedule == "rounds" else None,
                         f"{opts.method}: round {rnd}, {running} traces running")

        if progress and resume_from is not None and resume_from.within is not None:
            progress(resume_from.round, opts.max_steps, f"{opts.method}: resuming round "
                     f"{resume_from.round + 1} after its call {resume_from.within.calls}")
        part_extra = {k: (v[lo:hi] if k in ("route_queries", "prm_questions") else v)
                      for k, v in extra.items() if k != "router_s"}
        result = steer(small, large, tokenizer, prompts[lo:hi], opts, trace_ids=range(lo, hi),
                       progress=report, on_round=rounds, on_call=rounds, resume_from=resume_from,
                       batch_size=cfg["batch"]["size"], page_size=cfg["cache"]["page_size"],
                       pool_pages=pools, peers=peers, **part_extra)
        # The query router decided before the rounds (once per launch: a resumed run decides
        # again, and counts that pass instead).
        result = dataclasses.replace(result,
                                     routing_s=result.routing_s + extra.get("router_s", 0.0))
        saved = (result, time.perf_counter() - start + (rounds.wall_before if rounds else 0.0))
        parts.save(me, *saved)
    return saved


def _graded_summary(cfg: dict[str, Any], opts: SteerOptions, result: SteerResult,
                    examples: list, wall: float, mesh: Any, out: str | Path | None) -> Summary:
    """Every trace graded, the bill summed, and (with `out`) the run's files written."""
    from steer_jax.eval import extract_answer, grade

    name = cfg["benchmark"]["name"]
    answers = [extract_answer(name, t.output) for t in result.traces]
    correct = [grade(name, t.output, ex) for t, ex in zip(result.traces, examples)]
    summary = dataclasses.replace(
        summarize(result, correct, opts, name, wall),
        layout={"platform": jax.default_backend(), "processes": jax.process_count(),
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
    write_atomic(out / "traces.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "rounds.jsonl", "".join(json.dumps(dataclasses.asdict(m)) + "\n"
                                                for m in result.mixtures))
    # The summary last: its presence marks a complete run.
    write_atomic(out / "summary.json", json.dumps(dataclasses.asdict(summary), indent=2) + "\n")


