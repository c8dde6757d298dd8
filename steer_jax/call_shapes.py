"""Which compiled shape a call of the round loop gets: its rows (bucket), the positions each row
reads (width) and the cache slots it attends over (span). Every distinct shape is a compile, and
every padded row or position is work: the ladders below trade one against the other."""

from __future__ import annotations

import dataclasses


def _pow2(n: int, cap: int) -> int:
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def _ladder(n: int, floor: int = 1, sizes: int = 8) -> int:
    """n rounded up to one of `sizes` (a power of two) sizes per power of two (padding under
    1/sizes), in steps of at least `floor`."""
    step = max(floor, 1 << max(0, int(n - 1).bit_length() - sizes.bit_length()))
    return -(-int(n) // step) * step


def _width(lag: int, sizes: int = 8) -> int:
    """Positions a call reads per row: exactly 1 for the common case (only the pending token:
    the model wrote the step before), else `_ladder` in steps of 8 (powers of two would nearly
    double a judge read). Padding positions are not free: each is a query against every cache
    slot."""
    return 1 if lag <= 1 else _ladder(lag, 8, sizes)


def _bucket(n: int, cap: int, sizes: int = 8) -> int:
    """Rows a call compiles for: powers of two up to 16, then `_ladder`.

    Padding is then under an eighth of the call's rows (powers of two alone nearly double a
    call just past one); the ladder is relative, not multiples of cap/8, because the large
    model's calls, a third of the batch, are where padding costs most. A finer ladder costs
    compiled programs, but a call's cache span moves every round anyway.
    """
    return _pow2(n, cap) if n <= 16 else min(cap, _ladder(n, 1, sizes))


def _span(end: int, slots: int, page_size: int, sizes: int | None = None) -> int:
    """Cache slots a call attends over: its furthest slot rounded up to whole 64-slot steps
    (whole pages), with `sizes`, to one of that many step counts per power of two."""
    step = -(-64 // page_size) * page_size
    units = -(-(end + 2) // step)
    return min(slots, (units if sizes is None else _ladder(units, 1, sizes)) * step)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """How finely a schedule's calls pick their compiled shapes. Rounds make one call per
    model and phase; continuous rounds are a chunk long, so the rows, spans and read widths
    change every few dozen positions, and every new combination is a compile (on a TPU,
    seconds to a minute; on a CPU, mapped code, of which a process may hold only so much:
    `programs.maps_nearly_full`). Continuous calls take fewer sizes and pay more padding.
    Under the CPU kernel a call attends over the whole table (`RoundLoop.span`), so spans are
    no dimension there."""

    rows: int = 8
    widths: int = 8
    spans: int | None = None
