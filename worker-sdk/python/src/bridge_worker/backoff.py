"""Exponential backoff with jitter, for reconnects and hello resends."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``, each drawn
    uniformly from the upper half of the current step (``[step/2, step]``,
    "equal jitter"), so many workers restarted together do not reconnect in
    lockstep, and none waits much less than the step intends.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self._initial = initial
        self._max = maximum
        self._step = initial
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The next delay in seconds; advances the sequence."""
        step = self._step
        self._step = min(step * 2, self._max)
        return self._rng.uniform(step / 2, step)

    def reset(self) -> None:
        """Back to the first step (after a successful registration)."""
        self._step = self._initial
