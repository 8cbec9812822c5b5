"""Nothing lost, nothing twice: restarts, reset checkpoints, poison messages, lost brokers.

Every scenario runs the real streaming job against a real broker and counts the lake by
source offset (docs/architecture.md, "Exactly once into the lake"): each offset of the
readings topic must end in exactly one outcome, across runs, and ``meterflow reconcile``
must say so from the ledger and from the lake's files.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from helpers import (
    ROOT,
    assert_exactly_once,
    good,
    lake_offsets,
    reconciled,
    send,
    wait_for,
)
from pyspark.sql import SparkSession

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.errors import DataLossError, StreamUnavailableError
from meterflow.core.messages import DLQ_HEADER_STORED
from meterflow.local.broker import LocalBroker
from meterflow.stream.supervisor import run


def test_a_reset_checkpoint_neither_skips_nor_duplicates(spark: SparkSession, make_settings):
    """Issue: a fresh query numbered batches from 0 and the file sink skipped them."""
    settings = make_settings(partitions=2)
    send(settings, [good(i) for i in range(300)])
    first = run(settings, available_now=True, spark=spark)
    shutil.rmtree(settings.checkpoint_path)  # a new checkpoint, as after `checkpoint=reset`
    send(settings, [good(i) for i in range(300, 500)])
    second = run(settings, available_now=True, spark=spark)

    assert (first["read"], second["read"], second["skipped"]) == (300, 200, 0)
    assert_exactly_once(settings, 500)


def test_a_batch_redone_after_its_ledger_commit_writes_nothing(spark: SparkSession, make_settings):
    """Killed after the ledger committed but before Spark did: the batch runs again."""
    settings = make_settings(partitions=1, METERFLOW_MAX_OFFSETS_PER_TRIGGER="100")
    send(settings, [good(i) for i in range(200)])
    run(settings, available_now=True, spark=spark)  # two batches: 0..99, 100..199
    checkpoint = next(Path(settings.checkpoint_path, "streaming").iterdir())
    commits = sorted(
        (p for p in (checkpoint / "commits").iterdir() if p.name.isdigit()),
        key=lambda p: int(p.name),
    )
    commits[-1].unlink()  # Spark never recorded the batch's end
    (checkpoint / "commits" / f".{commits[-1].name}.crc").unlink(missing_ok=True)

    again = run(settings, available_now=True, spark=spark)

    assert (again["read"], again["skipped"]) == (0, 100)
    assert_exactly_once(settings, 200)


def test_a_checkpoint_ahead_of_the_lake_is_discarded(spark: SparkSession, make_settings, tmp_path):
    settings = make_settings(partitions=2)
    send(settings, [good(i) for i in range(120)])
    run(settings, available_now=True, spark=spark)
    moved = Settings.from_env(
        {
            **{v: getattr(settings, a) for v, a in _ENV.items()},
            "LAKE_PATH": str(tmp_path / "new-lake"),
            "CHECKPOINT_PATH": settings.checkpoint_path,
        }
    )
    totals = run(moved, available_now=True, spark=spark)
    assert totals["read"] == 120  # the old checkpoint would have read nothing
    assert_exactly_once(moved, 120)


_ENV = {
    "KAFKA_BOOTSTRAP_SERVERS": "bootstrap_servers",
    "METERFLOW_TOPIC_READINGS": "topic_readings",
    "METERFLOW_TOPIC_ABNORMAL": "topic_abnormal",
    "METERFLOW_TOPIC_DEADLETTER": "topic_deadletter",
    "METERFLOW_TOPIC_STATUS": "topic_status",
    "METERFLOW_KAFKA_SOURCE": "kafka_source",
}


def test_oversize_and_random_bytes_never_stop_the_stream(spark: SparkSession, make_settings):
    settings = make_settings(partitions=2)
    oversize = b'{"device_id": "em1", "pad": "' + b"x" * 2_000_000 + b'"}'
    noise = [os.urandom(n) for n in (1, 7, 64, 500, 4096) for _ in range(4)]
    messages = [good(i) for i in range(100)]
    messages[10:10] = [oversize]
    messages[50:50] = noise
    send(settings, messages)

    totals = run(settings, available_now=True, spark=spark)

    assert totals["read"] == len(messages) and totals["deadletter"] == 21
    assert_exactly_once(settings, len(messages))
    letters = kafka.read_to_end(settings.bootstrap_servers, settings.topic_deadletter)
    assert len(letters) == 21
    stored = [m for m in letters if DLQ_HEADER_STORED in dict(m.headers() or [])]
    assert len(stored) == 1
    reference = json.loads(stored[0].value())
    assert reference["bytes"] > 2_000_000
    kept = ds.dataset(Path(settings.lake_path) / reference["path"], format="parquet").to_table()
    source = reference["source"]
    (row,) = [
        r
        for r in kept.to_pylist()
        if (r["source_partition"], r["source_offset"]) == (source["partition"], source["offset"])
    ]
    assert (row["value"], row["reason"]) == (oversize, "OVERSIZE")
    raw = sorted(m.value() for m in letters if m is not stored[0])
    assert raw == sorted(noise)


def test_the_low_watermark_waits_for_the_slowest_partition(spark: SparkSession, make_settings):
    """Issue: during a backfill the watermark said the next morning while a partition was
    still in the middle of the day being written."""
    settings = make_settings(partitions=2)
    day_and_morning = [good(i, "em0") for i in range(0, 24 * 60 + 6 * 60, 15)]
    half_day = [good(i, "em1") for i in range(0, 8 * 60 + 16, 15)]
    future = json.dumps(
        {"device_id": "em0", "timestamp": "2099-01-01T00:00:00Z", "usage_kwh": 1}
    ).encode()
    send(settings, [*day_and_morning, future], partition=0)
    send(settings, half_day, partition=1)

    run(settings, available_now=True, spark=spark)

    # good(i) wraps at 24 h onto the same date: the slowest partition decides regardless.
    watermark = lake.read_watermark(settings.lake_path)
    assert watermark == datetime(2024, 5, 27, 8, 15, tzinfo=UTC)


# -- a broker of the test's own, restarted empty -----------------------------------------------


@pytest.fixture
def own_broker(tmp_path, free_port):
    broker = LocalBroker(free_port, tmp_path / "own-broker.log").start()
    yield broker
    broker.stop()


def _settings_on(broker: LocalBroker, tmp_path: Path, **env: str) -> Settings:
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "METERFLOW_DATA_DIR": str(tmp_path / "data"),
            "METERFLOW_KAFKA_SOURCE": "python",
            "METERFLOW_KAFKA_PARTITIONS": "1",
            **env,
        }
    )
    kafka.ensure_topics(settings.bootstrap_servers, settings.topics, 1)
    return settings


def _restart_empty(broker: LocalBroker, settings: Settings) -> None:
    broker.stop()
    broker.start()
    kafka.ensure_topics(settings.bootstrap_servers, settings.topics, 1)


def test_a_broker_back_empty_is_a_decision_and_the_gap_is_recorded(
    spark: SparkSession, own_broker: LocalBroker, tmp_path: Path
):
    settings = _settings_on(own_broker, tmp_path, METERFLOW_MAX_OFFSETS_PER_TRIGGER="60")
    send(settings, [good(i) for i in range(200)])
    stop = threading.Event()

    def stop_after_two(committer) -> None:
        def watch() -> None:
            while committer.batches < 2 and not stop.is_set():
                stop.wait(0.05)
            stop.set()

        threading.Thread(target=watch, daemon=True).start()

    first = run(settings, spark=spark, stop=stop, on_committer=stop_after_two)
    # Batches of 60: the stop is seen between batches, so a third one may have begun.
    read = first["read"]
    assert read in (120, 180)  # read..199 were on the broker, seen, and not read
    _restart_empty(own_broker, settings)
    send(settings, [good(i) for i in range(50)])

    with pytest.raises(DataLossError) as refused:
        run(settings, available_now=True, spark=spark)
    message = str(refused.value)
    assert "\n" not in message and f"{read}..199" in message and "--accept-data-loss" in message
    _spark_submit_waits_for_the_decision(settings, read)

    second = run(settings, available_now=True, spark=spark, accept_data_loss=True)
    assert second["read"] == 50
    report = reconciled(settings)
    lost = [loss for a in report.audits for loss in a.lost]
    assert [(start, end) for start, end, _ in lost] == [(read, 200)]
    generations = {g for g, _, _ in lake_offsets(settings)}
    assert len(generations) == 2


def _spark_submit_waits_for_the_decision(settings: Settings, read: int) -> None:
    """The compose service's way: the same one line, then no exit (no restart loop)."""
    import signal
    import subprocess
    import sys

    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERFLOW_DATA_DIR": str(settings.data_dir),
        "METERFLOW_KAFKA_SOURCE": "python",
        "METERFLOW_ON_DATA_LOSS": "wait",
        "PYSPARK_PYTHON": sys.executable,
    }
    job = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("spark-submit")),
            "--master",
            "local[1]",
            "jobs/streaming_job.py",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,  # to see that no process of it outlives the stop
    )
    seen: list[str] = []

    def waiting_line() -> bool:
        assert job.poll() is None, "".join(seen)[-3000:]
        seen.append(job.stdout.readline())  # type: ignore[union-attr]
        return "waiting for a decision" in seen[-1]

    try:
        wait_for(waiting_line, 180, "the job's waiting line", details=lambda: "".join(seen)[-3000:])
        # The claim is a duration: a job that did not wait would exit right after the line
        # (and its container restart into the same stop); it must still be up 3 s later.
        with pytest.raises(subprocess.TimeoutExpired):
            job.wait(3)
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(60)
    assert job.returncode in (3, 143)  # spark-submit's JVM may report the SIGTERM itself
    # The Python driver follows its JVM out: nothing of the job is left waiting.
    try:
        wait_for(lambda: not _group_alive(job.pid), 15, "the job's processes to end")
    finally:
        if _group_alive(job.pid):
            os.killpg(job.pid, signal.SIGKILL)
    stops = [line for line in seen if line.startswith("streaming_job: iot-meter is a new topic")]
    assert len(stops) == 1 and f"{read}..199" in stops[0]


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_new_abnormal_events_after_a_broker_restart_reach_mongodb(
    spark: SparkSession, own_broker: LocalBroker, tmp_path: Path, db
):
    """Issue: event ids were topic-partition-offset, so the new events were "duplicates"."""
    from meterflow.serving.sink import Sink

    settings = _settings_on(own_broker, tmp_path, METERFLOW_SINK_FLUSH_SECONDS="0")
    faulty = [good(i, value=-1) for i in range(50)]

    def stream_and_sink() -> int:
        send(settings, faulty)
        run(settings, available_now=True, spark=spark)
        sink = Sink(settings, db)

        def stored() -> bool:
            sink.poll_once(0.5)
            return sink.stats.events_written + sink.stats.duplicates >= 50

        wait_for(stored, 60, "the sink to write 50 events", details=sink.stats.summary)
        sink.flush()
        sink.close()
        return sink.stats.events_written

    assert stream_and_sink() == 50
    _restart_empty(own_broker, settings)  # the stream read everything: nothing is lost
    assert stream_and_sink() == 50
    assert db["abnormal_readings"].count_documents({}) == 100


def test_kafka_gone_for_good_is_one_line_after_the_retries(
    spark: SparkSession, own_broker: LocalBroker, tmp_path: Path
):
    settings = _settings_on(own_broker, tmp_path, METERFLOW_STREAM_RETRIES="1")
    send(settings, [good(i) for i in range(10)])
    run(settings, available_now=True, spark=spark)
    own_broker.stop()
    with pytest.raises(StreamUnavailableError) as failed:
        run(settings, available_now=True, spark=spark)
    message = str(failed.value)
    assert "\n" not in message and "after 1 retry (" in message
    assert own_broker.bootstrap in message
