"""The round loop's compiled programs, and the valve that drops them before a CPU process runs
out of memory maps."""

from __future__ import annotations

from steer_jax.calls import (_advance, _assign, _discard, _drop, _end_steps, _evict, _mixture,
                             _plan, _read, _rollback, _route, _slide, _verify, _write)
from steer_jax.mixture_pool import _ending, _keep_earlier

_PROGRAMS = (_write, _advance, _read, _verify, _plan, _evict, _drop, _rollback, _slide, _mixture,
             _route, _discard, _end_steps, _assign, _ending, _keep_earlier)
# XLA's CPU client maps each program's code as a few hundred memory regions (a STEER call's
# program: ~290), and Linux allows a process vm.max_map_count of them (65530 by default): a
# continuous run of 256 traces over 1024 positions compiled past that, and the next compile failed
# with "Cannot allocate memory". The loop drops its programs when the process holds 3/4 of it.
MAPS = "/proc/self/maps"


def compiled_programs() -> int:
    """How many programs the loop's device functions hold compiled."""
    return sum(f._cache_size() for f in _PROGRAMS)


def release_programs() -> None:
    """Drop every compiled program of the loop's device functions (the shapes of a run's later
    rounds are mostly new ones anyway)."""
    for f in _PROGRAMS:
        f.clear_cache()


_LOOKED_AT = [-1]  # compiled_programs() when the maps were last counted


def maps_nearly_full() -> bool:
    """Whether this process holds 3/4 of the memory maps Linux allows it (False elsewhere).

    Counting the maps reads tens of thousands of lines, and only a compile adds maps: the count
    is taken again only when the loop's programs changed since the last one."""
    programs = compiled_programs()
    if programs == _LOOKED_AT[0]:
        return False
    _LOOKED_AT[0] = programs
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            allowed = int(f.read())
        with open(MAPS, "rb") as f:
            return f.read().count(b"\n") > 0.75 * allowed
    except OSError:
        return False
