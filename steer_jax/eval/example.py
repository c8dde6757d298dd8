"""One benchmark question: what every loader gives and every grader takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One question. `reference` is the gold answer as a string, as the benchmark states it."""

    id: str
    question: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)
