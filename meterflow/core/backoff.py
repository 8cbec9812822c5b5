"""Waiting between attempts at something that fails for a while: one policy for the stream's
supervisor (Kafka away) and the sink's consumer (MongoDB or Kafka away).

A :class:`Backoff` counts failures in a row; the wait before the next attempt doubles with
each, from ``initial`` up to ``cap``; progress resets the count; after ``retries`` failures
in a row it gives up (the caller raises its own one-line error); a stop cuts a wait short.
The wait itself is injected: the stream waits on its stop event, the sink keeps polling its
consumer to stay in the group, and tests record the delays instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Backoff:
    """Capped exponential delays between failed attempts, reset by progress.

    After each failure call :meth:`failed` (count it; False once it is time to give up),
    then :meth:`wait` (False if stopped). Call :meth:`reset` once an attempt made progress.
    """

    def __init__(
        self,
        initial: float = 1.0,
        cap: float = 30.0,
        retries: int | None = None,
        *,
        stopped: Callable[[], bool] = lambda: False,
        wait: Callable[[float], object] = time.sleep,
    ) -> None:
        self.initial = initial
        self.cap = cap
        self.retries = retries  # None: never give up
        self.stopped = stopped
        self._wait = wait
        self.attempt = 0  # failures in a row

    @classmethod
    def until(
        cls,
        stop: threading.Event,
        initial: float = 1.0,
        cap: float = 30.0,
        retries: int | None = None,
    ) -> Backoff:
        """A backoff whose waits end early, and which stops, once ``stop`` is set."""
        return cls(initial, cap, retries, stopped=stop.is_set, wait=stop.wait)

    @property
    def delay(self) -> float:
        """The wait before the next attempt: ``initial``, doubled per failure, at most ``cap``."""
        return min(self.cap, self.initial * 2.0 ** max(0, self.attempt - 1))

    @property
    def gave_up(self) -> bool:
        """Whether ``retries`` failures in a row have been counted."""
        return self.retries is not None and self.attempt > self.retries

    def failed(self) -> bool:
        """Count a failure; whether to try again (False: it gave up)."""
        self.attempt += 1
        return not self.gave_up

    def wait(self) -> bool:
        """Wait :attr:`delay` unless stopped; whether to go on (False: stopped)."""
        if not self.stopped():
            self._wait(self.delay)
        return not self.stopped()

    def reset(self) -> None:
        """An attempt made progress: the next failure starts a new count."""
        self.attempt = 0
