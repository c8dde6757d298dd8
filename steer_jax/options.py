"""STEER's options: the `steer.*` and `sampling.*` config keys, checked when built."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

from steer_jax.decoding import sampler

METHODS = ("steer", "small_only", "large_only", "specreason", "rsd", "query_router")
CHUNK_TOKENS = 32  # steer.chunk's default under the continuous schedule


@dataclasses.dataclass(frozen=True)
class SteerOptions:
    """The `steer.*` and `sampling.*` config keys (see the README's config reference)."""

    method: Literal["steer", "small_only", "large_only", "specreason", "rsd",
                    "query_router"] = "steer"
    schedule: Literal["rounds", "continuous"] = "rounds"
    chunk: int | None = None  # tokens a write call decodes (None: a whole step in rounds, else 32)
    gamma: float = 0.5
    max_steps: int = 64
    max_step_tokens: int = 256
    max_new_tokens: int = 4096
    delimiter: str = "\n\n"
    confidence: sampler.Measure = "max_logit"
    aggregate: Literal["all", "math"] = "all"
    source: Literal["small", "generator"] = "small"
    groups: int = 1
    # Which traces a round's mixture is fitted over: those still running after the round (the
    # paper's), or those and the ones whose last step ended in it (the rule before #23).
    fit_over: Literal["running", "running_and_ended"] = "running"
    # A group whose pool holds fewer traces keeps its last fit made on at least this many
    # (README, "few survivors"); 1 refits every round whatever its size.
    min_fit_traces: int = 16
    refine: Literal["first", "none", "all"] = "first"
    policy: Literal["posterior", "percentile", "threshold"] = "posterior"
    percentile: float = 0.3
    threshold: float | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    judge_threshold: int = 7  # specreason: accept a small step scored at least this (0-9)
    prm_threshold: float = 0.7  # rsd: accept a small step whose PRM value is at least this

    def __post_init__(self) -> None:
        def choice(name: str, allowed: Sequence[Any]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"steer.{name} must be one of {list(allowed)}, "
                                 f"got {getattr(self, name)!r}")

        choice("method", METHODS)
        choice("schedule", ("rounds", "continuous"))
        if self.chunk is not None and (not isinstance(self.chunk, int) or self.chunk < 1):
            raise ValueError(f"steer.chunk must be a positive integer or null, got {self.chunk!r}")
        choice("confidence", sampler.MEASURES)
        choice("aggregate", ("all", "math"))
        choice("source", ("small", "generator"))
        choice("refine", ("first", "none", "all"))
        choice("fit_over", ("running", "running_and_ended"))
        choice("policy", ("posterior", "percentile", "threshold"))
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"steer.gamma must be in [0, 1], got {self.gamma}")
        if not 0.0 <= self.percentile <= 1.0:
            raise ValueError(f"steer.percentile must be in [0, 1], got {self.percentile}")
        if not 0 <= self.judge_threshold <= 9:
            raise ValueError(f"specreason.threshold must be in 0..9, got {self.judge_threshold}")
        if not 0.0 <= self.prm_threshold <= 1.0:
            raise ValueError(f"rsd.threshold must be in [0, 1], got {self.prm_threshold}")
        if self.policy == "threshold" and self.threshold is None:
            raise ValueError("steer.policy 'threshold' needs steer.threshold")
        if isinstance(self.min_fit_traces, bool) or not isinstance(self.min_fit_traces, int):
            raise ValueError(f"steer.min_fit_traces must be an integer, got "
                             f"{self.min_fit_traces!r}")
        for name in ("max_steps", "max_step_tokens", "max_new_tokens", "groups", "min_fit_traces"):
            if getattr(self, name) < 1:
                raise ValueError(f"steer.{name} must be >= 1, got {getattr(self, name)}")
        if not self.delimiter:
            raise ValueError("steer.delimiter must be a non-empty string")
        sampler.make_sampler(self.temperature, self.top_p)  # validates both
