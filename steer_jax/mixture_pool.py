"""Which traces a round's mixture is fitted over, and what a group with too few of them keeps.

`steer.fit_over` (the paper's rule by default): the mixture that routes the next step is fitted
over the traces that go on to one, "excluding traces that have already terminated". A trace whose
step of this round ended it (EOS, max_steps, max_new_tokens, a full cache) needs no routing; its
final, answer-bearing step is not what the running traces' next steps look like, so under
`running` it is scored under the fit but takes no part in it. `running_and_ended` keeps it in, the
rule before issue #23. A draft under check (refine) has not ended its trace yet: whether it is kept
is what the fit decides, so every draft is in the check's pool under either rule.

`steer.min_fit_traces` N: late rounds hold a few survivors, and a two-component fit of a few points
puts a component on one point at the variance floor, so the lowest of them goes to the large model
whatever gamma. A group whose pool holds fewer than N traces (with a valid confidence) keeps the
last fit of the same kind (`Fit.who`) that was made on at least N; one that has none such yet is
fitted on what it has, as every group is with N = 1.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from steer_jax.calls import ENDED, RUNNING, TraceState, stop_after_step
from steer_jax.options import SteerOptions
from steer_jax.round_state import Fit, RoundState
from steer_jax.routing import gmm


@functools.partial(jax.jit, static_argnames=("max_steps", "max_new_tokens", "slots"))
def _ending(state: TraceState, ended: jax.Array, *, max_steps: int, max_new_tokens: int,
            slots: int) -> jax.Array:
    return ended & (stop_after_step(state, max_steps, max_new_tokens, slots) != RUNNING)


def fit_pool(pool: jax.Array, s: RoundState, opts: SteerOptions, slots: int) -> jax.Array:
    """`pool` less, under `steer.fit_over: running`, the traces whose step that ended in the
    round in flight (`s.within`) ends them."""
    if opts.fit_over == "running_and_ended":
        return pool
    ended = s.within.running & (s.trace.author == ENDED)
    return pool & ~_ending(s.trace, ended, max_steps=opts.max_steps,
                           max_new_tokens=opts.max_new_tokens, slots=slots)


@functools.partial(jax.jit, static_argnames=("groups", "min_n"))
def _keep_earlier(params: gmm.GMMParams, post: jax.Array, conf: jax.Array, group: jax.Array,
                  earlier: gmm.GMMParams, origin: jax.Array, *, groups: int, min_n: int
                  ) -> tuple[gmm.GMMParams, jax.Array, jax.Array]:
    # n_valid of a kept fit is that of the fit it keeps, so a kept fit can be kept again.
    kept = (params.n_valid < min_n) & (earlier.n_valid >= min_n)  # [K]
    params = jax.tree.map(
        lambda new, old: jnp.where(kept.reshape(kept.shape + (1,) * (new.ndim - 1)), old, new),
        params, earlier)
    scores = jnp.broadcast_to(conf, (groups,) + conf.shape)
    again = jnp.take_along_axis(gmm.posterior_confident(params, scores), group[None, :], axis=0)[0]
    return params, jnp.where(kept[group], again, post), jnp.where(kept, origin, -1)


def few_survivors(params: gmm.GMMParams, post: jax.Array, conf: jax.Array, group: jax.Array,
                  fits: Sequence[Fit], who: str, opts: SteerOptions
                  ) -> tuple[gmm.GMMParams, jax.Array, jax.Array]:
    """A fresh fit (per group) and the posteriors under it, with the groups of fewer than
    `steer.min_fit_traces` valid confidences switched to the newest earlier fit of `who` made
    on at least that many; and [groups] the round each group's fit was kept from (-1: fitted
    now)."""
    groups, min_n = opts.groups, opts.min_fit_traces
    none = jnp.full((groups,), -1, jnp.int32)
    earlier = next((f for f in reversed(fits) if f.who == who), None)
    if min_n <= 1 or earlier is None:
        return params, post, none
    origin = earlier.round if earlier.kept_from is None else jnp.where(
        earlier.kept_from >= 0, earlier.kept_from, earlier.round)
    return _keep_earlier(params, post, conf, group, earlier.params,
                         jnp.broadcast_to(jnp.asarray(origin, jnp.int32), (groups,)),
                         groups=groups, min_n=min_n)
