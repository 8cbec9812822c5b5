"""Why a start of the stream ended, decided by the type of what was raised.

Failures reach the supervisor two ways. Raised on the driver (the committer, the episode
publisher, the planning), they are Python exceptions, classified with ``isinstance``
against meterflow's hierarchy (:mod:`meterflow.core.errors`). Raised in a Spark task, a
Python data source or the JVM, they arrive as a PySpark exception whose text embeds the
innermost raised exception's class name (a Python traceback's last line, a JVM trace's
``Caused by:``): :func:`raised_in` maps that name back to a class (meterflow's own errors,
the JVM Kafka client's "not now" exceptions as
:class:`~meterflow.clients.kafka.KafkaUnavailableError`, a JVM socket's time-out as
:class:`PythonWorkerTimeoutError`) and rebuilds it with its message.
No decision depends on the wording of a message.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from enum import Enum

from pyspark.errors import PySparkException

from meterflow.clients import kafka
from meterflow.core.errors import DataLossError, MeterflowError, TransientError
from meterflow.stream import dataloss
from meterflow.stream.commit import GenerationChangedError

#: The JVM Kafka client's exceptions that mean "not now" (the JVM source's transient
#: failures): each is a ``RetriableException`` in Kafka's own hierarchy.
JVM_KAFKA_TRANSIENT = frozenset(
    f"org.apache.kafka.common.errors.{name}"
    for name in (
        "TimeoutException",
        "NetworkException",
        "DisconnectException",
        "LeaderNotAvailableException",
        "NotLeaderOrFollowerException",
        "UnknownTopicOrPartitionException",
        "CoordinatorNotAvailableException",
        "RetriableException",
    )
)


class PythonWorkerTimeoutError(TransientError):
    """Spark gave up waiting for a task's Python worker (or another peer) to connect: a
    machine too busy to start one in time, not a bug; the same batch may run after a wait."""


#: The JVM's own "not now": a socket that timed out waiting on a peer (a Python worker
#: that did not connect back while the machine was saturated).
JVM_TRANSIENT: dict[str, type[Exception]] = {
    "java.net.SocketTimeoutException": PythonWorkerTimeoutError,
}
#: ``Name: message`` lines of a Python traceback (the last is what was raised) and of a
#: JVM trace (``Caused by: Name: message``, the last being the root cause).
_RAISED = re.compile(r"^\s*(?:Caused by: )?([A-Za-z_][\w.$]*(?:Error|Exception))(?:: (.*))?$")


class Verdict(Enum):
    """What the supervisor does after a start ended with a failure."""

    RESTART = "restart"  # the topic was recreated under the query: plan again at once
    RETRY = "retry"  # a service is away: start again after a backoff
    STOP = "stop"  # a decision or a bad configuration: its own one line, its exit code
    FAIL = "fail"  # a bug or unknown: the whole story in the log, one line out


@dataclass(frozen=True)
class Failure:
    """A classified failure: the verdict, the error as its own class, and one line."""

    verdict: Verdict
    error: BaseException
    line: str


def classify(error: BaseException) -> Failure:
    """The verdict on ``error``, by the class of what was raised (see the module's doc)."""
    raised, line = raised_in(error)
    if isinstance(raised, GenerationChangedError):
        verdict = Verdict.RESTART
    elif isinstance(raised, TransientError):
        verdict = Verdict.RETRY
    elif isinstance(raised, MeterflowError):
        verdict = Verdict.STOP
    else:
        verdict = Verdict.FAIL
    return Failure(verdict, raised, line)


def raised_in(error: BaseException) -> tuple[BaseException, str]:
    """What was raised, as its own class where it is known, and the line saying what.

    A PySpark exception stands for something raised elsewhere: its text names the class.
    A data loss found by the Kafka source gets the stream's remedy
    (:func:`~meterflow.stream.dataloss.gone_from_source`).
    """
    found = innermost(spark_text(error)) if isinstance(error, PySparkException) else None
    if found is None:
        return error, _line(error)
    name, message = found
    line = f"{name.rsplit('.', 1)[-1]}: {message}"[:400]
    known = known_errors().get(name)
    if known is None:
        return error, line
    if issubclass(known, DataLossError):
        return dataloss.gone_from_source(message), line
    try:
        return known(message), line
    except TypeError:  # a class that is not built from its message alone
        return error, line


def _line(error: BaseException) -> str:
    """Meterflow's own message says it all; any other is named by its class."""
    text = first_line(str(error))
    if isinstance(error, MeterflowError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def innermost(text: str) -> tuple[str, str] | None:
    """The class name and message of the last ``Name: message`` line of ``text``: what a
    Python traceback raised, or a JVM trace's root cause."""
    found = None
    for raw in text.splitlines():
        match = _RAISED.match(raw)
        if match:
            found = (match.group(1), (match.group(2) or "").strip())
    return found


def known_errors() -> dict[str, type[Exception]]:
    """The classes a failure's text may name, by their full name: every meterflow error
    (the classes of the modules imported, which include all the stream raises) and the
    JVM Kafka client's transient exceptions, as :class:`KafkaUnavailableError`."""
    known: dict[str, type[Exception]] = {
        **dict.fromkeys(JVM_KAFKA_TRANSIENT, kafka.KafkaUnavailableError),
        **JVM_TRANSIENT,
    }
    pending: list[type[Exception]] = [MeterflowError]
    while pending:
        cls = pending.pop()
        known[f"{cls.__module__}.{cls.__qualname__}"] = cls
        pending.extend(cls.__subclasses__())
    return known


def spark_text(error: BaseException) -> str:
    """A PySpark exception's text with its JVM causes' traces, where class names are.

    PySpark keeps a converted cause's JVM trace in ``_stackTrace``; the query's own text
    names only the message of a JVM failure.
    """
    parts = [str(error)]
    cause = getattr(error, "_cause", None)
    while cause is not None and len(parts) < 10:
        parts.append(str(getattr(cause, "_stackTrace", "") or ""))
        cause = getattr(cause, "_cause", None)
    return "\n".join(parts)


def story(error: BaseException) -> str:
    """The whole of a failure for the log: a PySpark exception's text with its JVM causes'
    traces (:func:`spark_text`), any other's Python traceback."""
    if isinstance(error, PySparkException):
        return spark_text(error)
    return "".join(traceback.format_exception(error)).rstrip()


def first_line(text: str) -> str:
    """The first line of ``text`` that is not blank, at most 400 characters."""
    return next((line.strip()[:400] for line in text.splitlines() if line.strip()), "")
