"""Routing latency: the device time a run spends deciding who writes (issue #23, Fig. 4).

The routing work is STEER's mixture fit, posterior and policy, SpecReason's judge pass, the PRM's
passes of RSD, and the query router's pass over the prompts. Each piece runs with the device
synchronised around exactly it: everything it reads is ready before the clock starts, and its
outputs are ready before the clock stops, so no earlier or later call is counted. Compiling is
not routing: the intervals in which JAX traced, lowered or compiled a program during the piece
(as `jax.monitoring` reports them) are taken out. The synchronisation makes the host wait where
it would have queued the next call, so the run is measured with these waits in it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, TypeVar

import jax

from steer_jax.round_state import RoundState

T = TypeVar("T")

# JAX's compile pipeline: tracing to a jaxpr, lowering to MLIR, the backend's compile.
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})

_spans = threading.local()  # .open: the compile spans seen by this thread's piece in flight


def _on_span(event: str, start: float, end: float, **_: Any) -> None:
    spans = getattr(_spans, "open", None)
    if spans is not None and event in COMPILE_EVENTS:
        spans.append((start, end))


if hasattr(jax.monitoring, "register_event_time_span_listener"):
    jax.monitoring.register_event_time_span_listener(_on_span)
else:  # older JAX reports durations only, at their end
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, took, **_: _on_span(event, time.time() - took, time.time()))


def _covered(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] inside the union of `spans` (nested traces overlap their callers)."""
    total, reach = 0.0, lo
    for start, end in sorted(spans):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


def seconds(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """`fn(*args, **kwargs)` and the seconds it took, its arguments ready on the device before
    the clock starts and its result ready before it stops, compiling left out."""
    jax.block_until_ready((args, kwargs))
    outer = getattr(_spans, "open", None)
    _spans.open = []
    try:
        lo, start = time.time(), time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        elapsed, hi = time.perf_counter() - start, time.time()
        compiling = _covered(_spans.open, lo, hi)
    finally:
        spans, _spans.open = _spans.open, outer
        if outer is not None:  # a piece inside a piece: the outer one leaves the compiles out too
            outer.extend(spans)
    return out, max(elapsed - compiling, 0.0)


def timed(s: RoundState, fn: Callable[..., T], *args: Any, when: bool = True,
          **kwargs: Any) -> tuple[RoundState, T]:
    """`fn(*args, **kwargs)` as the loop's routing work: its seconds added to `s.routing_s`.
    The state's arrays are made ready first too, so calls still running from before are not
    counted. With `when` False it is no routing work (nothing decides): it just runs."""
    if not when:
        return s, fn(*args, **kwargs)
    jax.block_until_ready((s.trace, s.caches, s.routing))
    out, took = seconds(fn, *args, **kwargs)
    return dataclasses.replace(s, routing_s=s.routing_s + took), out


def per(total_s: float, count: int) -> float:
    """Seconds per query or per round; 0.0 when there were none (nothing was decided)."""
    return total_s / count if count > 0 else 0.0
