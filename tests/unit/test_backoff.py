"""The one backoff of the stream's supervisor and the sink (meterflow.core.backoff), with the
wait injected: no test sleeps."""

from __future__ import annotations

import threading

from meterflow.core.backoff import Backoff


def test_delays_double_from_initial_up_to_the_cap() -> None:
    waited: list[float] = []
    backoff = Backoff(0.5, 3.0, wait=waited.append)
    for _ in range(5):
        assert backoff.failed()
        assert backoff.wait()
    assert waited == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_it_gives_up_after_retries_failures_in_a_row_and_progress_resets_the_count() -> None:
    waited: list[float] = []
    backoff = Backoff(1.0, 30.0, retries=2, wait=waited.append)
    assert backoff.failed() and backoff.wait()
    assert backoff.failed() and backoff.wait()
    backoff.reset()  # an attempt made progress: a new outage
    assert backoff.failed() and backoff.wait()
    assert backoff.failed() and backoff.wait()
    assert not backoff.failed() and backoff.gave_up
    assert waited == [1.0, 2.0, 1.0, 2.0]


def test_without_retries_it_never_gives_up() -> None:
    backoff = Backoff(0.1, 0.2, wait=lambda _s: None)
    assert all(backoff.failed() for _ in range(1000))
    assert backoff.delay == 0.2


def test_a_stop_ends_the_wait_and_says_so() -> None:
    stop = threading.Event()
    calls: list[float] = []

    def wait(seconds: float) -> None:
        calls.append(seconds)
        stop.set()  # the stop arrives while waiting

    backoff = Backoff(2.0, stopped=stop.is_set, wait=wait)
    assert backoff.failed()
    assert not backoff.wait()
    assert not backoff.wait() and calls == [2.0]  # stopped: no further wait


def test_until_an_event_waits_on_the_event() -> None:
    stop = threading.Event()
    stop.set()
    backoff = Backoff.until(stop, initial=60.0, cap=120.0, retries=3)
    assert backoff.failed()
    assert not backoff.wait()  # returns at once: the event is set
    assert (backoff.retries, backoff.delay) == (3, 60.0)
