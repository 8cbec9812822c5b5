"""Logging set-up: one line per event, ``key=value`` pairs, so logs are easy to grep."""

from __future__ import annotations

import logging
import sys
from datetime import datetime

_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def timestamp(epoch: float) -> str:
    """Local ISO 8601 time with milliseconds, as log lines start (for times in messages)."""
    moment = datetime.fromtimestamp(epoch).astimezone()
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}{moment:%z}"


class _Formatter(logging.Formatter):
    """Milliseconds in each line's time: how late a line is shows below a second too."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record.created)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def setup_logging(level: str | None = None) -> None:
    """Log to stderr at ``level`` (default ``METERFLOW_LOG_LEVEL``)."""
    from meterflow.core.config import env_value  # config's modules log: import it late

    level = (level or env_value("METERFLOW_LOG_LEVEL")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(_FORMAT))
    root = logging.getLogger("meterflow")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for name in ("jobs", "simulator"):
        logging.getLogger(name).handlers[:] = [handler]
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).propagate = False


def ensure_logging() -> None:
    """:func:`setup_logging` unless done in this process (Spark's Python workers start bare)."""
    if not logging.getLogger("meterflow").handlers:
        setup_logging()
