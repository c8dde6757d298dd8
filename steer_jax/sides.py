"""One model's side of the round loop: its weights, vocabulary tables and stop tokens, and how
the loop's state takes its cache back."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from steer_jax import distributed
from steer_jax.calls import MODEL_NAMES, TraceState
from steer_jax.decoding import sampler
from steer_jax.decoding.steps import VocabMasks
from steer_jax.modeling.kv_cache import KVCache
from steer_jax.modeling.transformer import Model
from steer_jax.round_state import RoundState


@dataclasses.dataclass(frozen=True)
class Side:
    """One model inside a run: its weights, its vocabulary tables, its stop tokens. Its cache is
    in the loop's state (`RoundState.caches[stream]`)."""

    model: Model
    stream: int  # SMALL, LARGE or PRM: its index in the caches and the bill
    masks: VocabMasks
    stops: sampler.Stops

    @property
    def cfg(self) -> Any:
        return self.model.config

    def window(self, cache: KVCache, span: int) -> dict[str, Any]:
        """`_plan`'s static arguments for this model's sliding layers' pool, if it has one."""
        return dict(window=self.cfg.sliding_window, span=span) if cache.split else {}


def side_and_cache(model: Model, stream: int, masks: VocabMasks, batch: int, slots: int,
                   page_size: int, pool: tuple[int | None, int | None],
                   cache: KVCache | None = None) -> tuple[Side, KVCache]:
    """A model's side of the loop and its cache: a fresh one (on a mesh, placed like the
    weights), or `cache` from a state to resume, checked to be of this run's shapes."""
    cfg = model.config
    init = functools.partial(KVCache.init, cfg, batch, slots, model.dtype, page_size=page_size,
                             pool=pool[0], pool_local=pool[1])
    fresh = jax.eval_shape(init)
    if cache is None:
        # On a mesh the cache follows the weights: KV heads over 'model', rows over 'data'.
        cache = distributed.place_cache(init(), model.params)
    else:
        if cache.split != fresh.split:
            raise ValueError(f"resume_from: the {MODEL_NAMES[stream]} model's cache has "
                             f"{1 + cache.split} pools, this run needs {1 + fresh.split}")
        for f in ("k", "pages") + (("k_local", "pages_local") if fresh.split else ()):
            a, b = getattr(cache, f), getattr(fresh, f)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"resume_from: the {MODEL_NAMES[stream]} model's cache.{f} "
                                 f"is {a.dtype}{list(a.shape)}, this run needs "
                                 f"{b.dtype}{list(b.shape)}")
    stops = sampler.Stops(cfg.eos_token_ids, step_mode=True)
    return Side(model, stream, masks, stops), cache


def with_cache(s: RoundState, side: Side, cache: KVCache, trace: TraceState | None = None
               ) -> RoundState:
    """`s` with `side`'s cache replaced (and its trace state, when given)."""
    caches = s.caches[:side.stream] + (cache,) + s.caches[side.stream + 1:]
    return dataclasses.replace(s, caches=caches, trace=s.trace if trace is None else trace)
