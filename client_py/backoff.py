"""Reconnect delays: exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (0-based): ``min(max, base * 2**n)``, scaled by a random
    factor in ``[1 - jitter, 1]`` so that many clients do not reconnect in lockstep."""

    base: float = 0.1
    max: float = 2.5
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.base <= 0 or self.max < self.base:
            raise ValueError("backoff needs 0 < base <= max")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max, self.base * 2 ** min(attempt, 64))
        return ceiling * (1 - self.jitter * self.rng.random())
