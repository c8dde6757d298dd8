"""What a STEER run returns: traces as text with their steps and bill, and the mixtures it fitted.
`collect` turns the loop's device state into them; it is the only place tokens become text."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from steer_jax.calls import MODEL_NAMES, STOPS, TraceState
from steer_jax.modeling.transformer import Model
from steer_jax.options import SteerOptions
from steer_jax.round_state import Fit


@dataclasses.dataclass(frozen=True)
class Step:
    text: str
    model: str  # small | large
    tokens: int
    confidence: float
    posterior: float
    round: int  # the round it ended in (rounds: its index; continuous: its chunk boundary)
    score: float | None = None  # specreason's judge digit or rsd's PRM value for a small step


@dataclasses.dataclass(frozen=True)
class Trace:
    id: int
    output: str
    tokens: list[int]  # generated tokens (the kept steps)
    steps: list[Step]
    stop: str  # eos | max_steps | max_new_tokens | cache_full
    # Per-trace bill, in tokens; FLOPs are these times 2N of the model that processed them.
    generated: dict[str, int]  # kept tokens written by each model
    discarded: int  # small-model draft tokens thrown away
    read: dict[str, int]  # tokens each model appended without writing them (prompt, catch-up,
    # judge prompts; "prm": the reward model's reads)


@dataclasses.dataclass(frozen=True)
class RoundMixture:
    round: int
    group: int
    model: str  # whose steps the mixture was fitted on ("all" with source=small)
    weights: list[float]
    means: list[float]
    variances: list[float]
    confidences: list[float]
    n: int = 0  # how many confidences it was fitted on (its round's pool, if kept)
    kept_from: int | None = None  # the round whose fit it kept (steer.min_fit_traces)


@dataclasses.dataclass(frozen=True)
class SteerResult:
    traces: list[Trace]
    mixtures: list[RoundMixture]
    executed_tokens: dict[str, int]  # rows actually computed x positions, padding included
    params: dict[str, int]
    iterations: dict[str, int] = dataclasses.field(default_factory=dict)  # decode positions
    # stepped by each model's write calls, one after another (their sum bounds the wall-clock
    # where a step costs the same for any number of rows)
    routing_s: float = 0.0  # device seconds spent deciding who writes (latency.py)
    rounds: int = 0  # rounds run (continuous: chunk boundaries)


def collect(state: TraceState, fits: Sequence[Fit], tokenizer: Any, opts: SteerOptions,
            models: Sequence[Model], ids: np.ndarray, *, routing_s: float = 0.0,
            rounds: int = 0) -> SteerResult:
    """The loop's final state as text: each trace's steps decoded, its bill, every mixture per
    group with the confidences it was fitted on, and the routing seconds over `rounds`."""
    s = jax.tree.map(np.asarray, state)
    traces = []
    for b in range(s.total.shape[0]):
        start, steps = int(s.prompt_len[b]), []
        for m in range(opts.max_steps):
            if s.rec_model[b, m] < 0:
                break
            n = int(s.rec_len[b, m])
            steps.append(Step(text=tokenizer.decode(s.tokens[b, start:start + n].tolist()),
                              model=MODEL_NAMES[s.rec_model[b, m]], tokens=n,
                              confidence=float(s.rec_conf[b, m]),
                              posterior=float(s.rec_post[b, m]), round=int(s.rec_at[b, m]),
                              score=None if np.isnan(s.rec_score[b, m])
                              else float(s.rec_score[b, m])))
            start += n
        gen = s.tokens[b, s.prompt_len[b]:s.total[b]].tolist()
        traces.append(Trace(
            id=int(ids[b]), output=tokenizer.decode(gen, skip_special_tokens=True), tokens=gen,
            steps=steps, stop=STOPS[s.stop[b]],
            generated={MODEL_NAMES[i]: int(s.generated[b, i]) for i in (0, 1)},
            discarded=int(s.discarded[b]),
            read={MODEL_NAMES[i]: int(s.read[b, i]) for i in range(len(models))}))
    mix = []
    for m in fits:
        p = jax.tree.map(np.asarray, m.params)
        conf, among = np.asarray(m.conf), np.asarray(m.among)
        kept = np.full(opts.groups, -1) if m.kept_from is None else np.asarray(m.kept_from)
        for g in range(opts.groups):
            members = among & (np.arange(len(conf)) * opts.groups // len(conf) == g)
            mix.append(RoundMixture(m.round, g, m.who, p.weights[g].tolist(),
                                    p.means[g].tolist(), p.variances[g].tolist(),
                                    conf[members].tolist(), int(members.sum()),
                                    None if kept[g] < 0 else int(kept[g])))
    names = [MODEL_NAMES[i] for i in range(len(models))]
    return SteerResult(traces, mix, {n: int(s.executed[i]) for i, n in enumerate(names)},
                       {n: models[i].num_params for i, n in enumerate(names)},
                       {n: int(s.iterations[i]) for i, n in enumerate(names)},
                       routing_s, rounds)
