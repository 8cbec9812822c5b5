"""How the stream's supervisor classifies a failure (meterflow.stream.failures): by the class
of what was raised, never by the wording of a message.

The Spark texts under tests/data/failures are real: the Python data source's latestOffset
timing out while tests/integration/test_failures.py stalled the broker, and exceptions
raised in the Python worker of a real micro-batch, as ``collect()`` re-raised them in
``foreachBatch``. The JVM source's (``jvm_source_timeout.txt``) is written in the shape of
Spark's and Kafka's texts: the JVM connector is a jar CI cannot download.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from pyspark.errors import PySparkException

from meterflow.clients.kafka import KafkaUnavailableError, unavailable_as_error
from meterflow.core.errors import DataLossError, MeterflowError, TransientError
from meterflow.stream.commit import GenerationChangedError
from meterflow.stream.failures import (
    PythonWorkerTimeoutError,
    Verdict,
    classify,
    innermost,
    known_errors,
)

TEXTS = Path(__file__).resolve().parents[1] / "data" / "failures"


class SparkFailure(PySparkException):
    """A PySpark exception carrying a captured text, as PySpark's own do (without a JVM)."""

    def __init__(self, text: str) -> None:
        super().__init__(message=text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def spark_failure(name: str) -> SparkFailure:
    return SparkFailure((TEXTS / name).read_text())


def test_kafka_unavailable_is_transient_and_stays_a_meterflow_error() -> None:
    assert issubclass(KafkaUnavailableError, TransientError)
    assert issubclass(TransientError, MeterflowError)


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (KafkaUnavailableError("Kafka at b:1 could not describe t"), Verdict.RETRY),
        (GenerationChangedError("t was recreated"), Verdict.RESTART),
        (DataLossError("t[0] 1..2 were deleted"), Verdict.STOP),
        (MeterflowError("a decision"), Verdict.STOP),
        (KeyError("missing"), Verdict.FAIL),
        # "Timed out" in the text of a bug does not make it a retry.
        (ValueError("Timed out waiting for the lock: _TRANSPORT"), Verdict.FAIL),
    ],
)
def test_driver_errors_are_classified_by_their_class(
    error: BaseException, verdict: Verdict
) -> None:
    failure = classify(error)
    assert failure.verdict is verdict
    assert failure.error is error  # raised on the driver: kept as it is


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (KafkaError._TIMED_OUT, True),
        (KafkaError._TRANSPORT, True),
        (KafkaError._ALL_BROKERS_DOWN, True),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, False),
    ],
)
def test_librdkafkas_not_now_becomes_kafka_unavailable(code: int, transient: bool) -> None:
    """What the Python source's planning calls raise (list_topics, watermarks)."""

    def fail() -> None:
        with unavailable_as_error("listing the partitions of t"):
            raise KafkaException(KafkaError(code))

    if transient:
        with pytest.raises(KafkaUnavailableError, match=r"^listing the partitions of t: "):
            fail()
    else:
        with pytest.raises(KafkaException):
            fail()


def test_the_python_sources_time_out_is_a_retry() -> None:
    failure = classify(spark_failure("source_latest_offset_timed_out.txt"))
    assert failure.verdict is Verdict.RETRY
    assert type(failure.error) is KafkaUnavailableError
    assert str(failure.error) == (
        "listing the partitions of iot-meter: Failed to get metadata: Local: Timed out"
    )
    assert failure.line == (
        "KafkaUnavailableError: listing the partitions of iot-meter: "
        "Failed to get metadata: Local: Timed out"
    )


def test_kafka_away_in_a_task_is_a_retry() -> None:
    failure = classify(spark_failure("task_kafka_unavailable.txt"))
    assert failure.verdict is Verdict.RETRY
    assert str(failure.error).startswith("reading iot-meter[1]: KafkaError{code=_TRANSPORT")


def test_offsets_gone_in_a_task_stop_with_the_remedy() -> None:
    failure = classify(spark_failure("task_data_loss.txt"))
    assert failure.verdict is Verdict.STOP
    assert isinstance(failure.error, DataLossError) and failure.error.exit_code == 3
    assert str(failure.error) == (
        "iot-meter[0] offsets from 120 are gone from the broker (Broker: Offset out of range); "
        "--accept-data-loss records what is gone in the ledger and continues"
    )


def test_a_bug_in_a_task_fails_with_its_own_line() -> None:
    error = spark_failure("task_bug.txt")
    failure = classify(error)
    assert failure.verdict is Verdict.FAIL
    assert failure.error is error  # the whole story stays for the log
    assert failure.line == "KeyError: 'missing'"


def test_the_jvm_sources_kafka_timeout_is_a_retry() -> None:
    failure = classify(spark_failure("jvm_source_timeout.txt"))
    assert failure.verdict is Verdict.RETRY
    assert failure.line.startswith("TimeoutException: Timeout of 60000ms expired")


def test_a_python_worker_that_did_not_connect_back_is_a_retry() -> None:
    """Seen in bench/memory.py: the streaming job, forking a worker per task beside the
    daily job on two saturated cores, stopped on this; it is a wait, not a bug. The text is
    written in the shape of that failure (its first lines and root cause as logged)."""
    failure = classify(spark_failure("python_worker_timeout.txt"))
    assert failure.verdict is Verdict.RETRY
    assert isinstance(failure.error, PythonWorkerTimeoutError)
    assert failure.line == (
        "SocketTimeoutException: Timed out while waiting for the Python worker to connect back"
    )


def test_the_innermost_raised_class_wins_over_the_ones_around_it() -> None:
    """Python prints the raised exception last; a JVM trace its root cause last."""
    text = (
        "pyspark.errors.exceptions.captured.PythonException: An exception was thrown:\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "meterflow.clients.kafka.KafkaUnavailableError: reading t[0]: timed out\n"
        "\n"
        "During handling of the above exception, another exception occurred:\n"
        "\n"
        "AttributeError: 'NoneType' object has no attribute 'close'\n"
    )
    assert innermost(text) == ("AttributeError", "'NoneType' object has no attribute 'close'")
    assert classify(SparkFailure(text)).verdict is Verdict.FAIL  # the bug is what was raised
    caused = "org.apache.spark.SparkException: Job aborted\n\tat x\nCaused by: java.io.IOException"
    assert innermost(caused) == ("java.io.IOException", "")


def test_every_meterflow_error_is_known_by_its_full_name() -> None:
    known = known_errors()
    assert known["meterflow.clients.kafka.KafkaUnavailableError"] is KafkaUnavailableError
    assert known["meterflow.core.errors.DataLossError"] is DataLossError
    assert known["meterflow.stream.commit.GenerationChangedError"] is GenerationChangedError
    assert known["org.apache.kafka.common.errors.TimeoutException"] is KafkaUnavailableError
    assert "KafkaUnavailableError" not in known  # a bare name could be anyone's
