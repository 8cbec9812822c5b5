"""Stopping on Ctrl-C and SIGTERM: one way for every long-running command."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: What :func:`signal.signal` calls: the signal's number and the interrupted frame.
SignalHandler = Callable[[int, FrameType | None], Any]


@contextmanager
def signals_handled(handler: SignalHandler) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM while the block runs, the previous handlers after.

    Only the main thread can install handlers; elsewhere the block runs without them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
