"""The stateful stage in the running stream: readings through the broker, the lake query's
digests, the detector query and its episode events on iot-abnormal; restarted in the
middle of a STUCK run and of a silent span, it loses no episode change and repeats none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from helpers import (
    committed_offsets,
    log_records,
    log_tail,
    recreate_topic,
    send,
    still_running,
    wait_for,
)
from pyspark.sql import SparkSession

from meterflow.clients import kafka, mongo
from meterflow.core import messages
from meterflow.core.config import Settings
from meterflow.core.timestamps import format_timestamp_us, parse_timestamp_us
from meterflow.serving.sink import Sink
from meterflow.stream.supervisor import run

#: A dynamic member with Kafka's shortest session: group joins on the local broker are slow.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}

T0 = parse_timestamp_us("2024-05-27T00:00:00Z")
STEP_US = 900 * 1_000_000


def at(i: int) -> int:
    return T0 + i * STEP_US


def normal(i: int) -> float:
    return round(0.2 + 0.05 * ((i * 7) % 11) + 0.001 * (i % 13), 3)


def reading(device: str, i: int, value: float) -> dict[str, object]:
    """Reading ``i`` of ``device``, 15 minutes after reading ``i - 1``."""
    return {"device_id": device, "timestamp": format_timestamp_us(at(i)), "usage_kwh": value}


def episode_events(settings: Settings) -> list[messages.AbnormalEvent]:
    events = [
        messages.decode(m.value(), messages.AbnormalEvent)
        for m in kafka.read_to_end(settings.bootstrap_servers, settings.topic_abnormal)
    ]
    return [e for e in events if e.episode is not None]


def detector_committed(checkpoint_path: str) -> bool:
    """Whether the detector query has committed a batch: both queries are up (its
    checkpoint is ``CHECKPOINT_PATH/detector/<clock>/<topic>-<topic id>``)."""
    return any(Path(checkpoint_path, "detector").glob("*/*/commits/[0-9]*"))


def test_episodes_reach_iot_abnormal_once_across_restarts_and_become_incidents(
    spark: SparkSession, make_settings, mongo_uri: str, mongo_db_name: str, db
) -> None:
    settings = make_settings(
        partitions=2,
        METERFLOW_DETECTION="on",
        METERFLOW_DETECTION_TIME="event",
        MONGO_URI=mongo_uri,
        MONGO_DB=mongo_db_name,
        METERFLOW_SINK_GROUP=f"sink-{uuid.uuid4().hex[:8]}",
        METERFLOW_SINK_FLUSH_SECONDS="0.2",
    )
    # em1 turns stuck at reading 10; em2 reports until reading 13, then falls silent.
    send(settings, [reading("em1", i, normal(i)) for i in range(10)])
    send(settings, [reading("em2", i, normal(i)) for i in range(14)])
    send(settings, [reading("em1", i, 0.777) for i in range(10, 14)])
    first = run(settings, available_now=True, spark=spark)
    assert first["read"] == 28 and episode_events(settings) == []  # four repeats of eight

    send(settings, [reading("em1", i, 0.777) for i in range(14, 24)])  # restart in the STUCK run
    second = run(settings, available_now=True, spark=spark)
    assert second["open_STUCK"] == 1
    send(settings, [reading("em1", i, 0.777) for i in range(24, 26)])  # restart in em2's silence
    run(settings, available_now=True, spark=spark)
    send(settings, [reading("em1", 26, 0.5), reading("em2", 26, normal(26))])  # both recover
    run(settings, available_now=True, spark=spark)

    events = episode_events(settings)
    seen = Counter(
        (e.device_id, e.fault_code, e.episode.action, e.episode.start)
        for e in events
        if e.episode is not None
    )
    start = lambda i: format_timestamp_us(at(i))  # noqa: E731
    assert seen == {
        ("em1", "STUCK", "open", start(10)): 1,
        ("em1", "STUCK", "clear", start(10)): 1,
        ("em2", "NO_DATA", "open", start(14)): 1,
        ("em2", "NO_DATA", "clear", start(14)): 1,
    }
    opened = next(e for e in events if e.fault_code == "STUCK" and e.episode.action == "open")
    assert opened.event_id == f"em1|STUCK|{at(10)}|open"
    assert opened.timestamp == start(17) and opened.reading == {"value": 0.777}
    assert opened.source is None and opened.reason and "repeated 8 times" in opened.reason
    # The stateless events of these readings: none (every reading was good).
    assert len(kafka.read_to_end(settings.bootstrap_servers, settings.topic_abnormal)) == len(
        events
    )

    # The sink turns them into incidents: one per episode, opened and closed, none left open.
    consumed = len(events) + len(
        kafka.read_to_end(settings.bootstrap_servers, settings.topic_status)
    )
    sink = Sink(settings, db, consumer_overrides=FAST_GROUP, instance_id=False)
    deadline = time.monotonic() + 90
    sink.run(lambda: sink.stats.consumed >= consumed or time.monotonic() > deadline)
    incidents = {i["_id"]: i for i in db[mongo.INCIDENTS].find({"origin": "rule"})}
    assert set(incidents) == {f"em1|STUCK|{at(10)}", f"em2|NO_DATA|{at(14)}"}
    stuck, silent = incidents[f"em1|STUCK|{at(10)}"], incidents[f"em2|NO_DATA|{at(14)}"]
    assert (stuck["status"], stuck["severity"]) == ("closed", "major")
    assert (silent["status"], silent["severity"]) == ("closed", "major")
    assert stuck["closed_at"].replace(tzinfo=UTC) == datetime.fromtimestamp(at(26) / 1e6, UTC)
    for device in ("em1", "em2"):
        assert not db[mongo.METER_STATUS].find_one({"_id": device}).get("open_episodes")


def test_a_recreated_digest_topic_keeps_each_meters_history(
    spark: SparkSession, make_settings
) -> None:
    """Issue: every restart of `meterflow run` (a new local broker, so a new digest topic)
    threw each meter's history away. The new generation's checkpoint starts from the old
    one's state: a STUCK run begun before the topic was recreated still opens."""
    settings = make_settings(
        partitions=2, METERFLOW_DETECTION="on", METERFLOW_DETECTION_TIME="event"
    )
    send(settings, [reading("em1", i, normal(i)) for i in range(10)])
    send(settings, [reading("em1", i, 0.777) for i in range(10, 14)])  # four repeats of eight
    first = run(settings, available_now=True, spark=spark)
    assert first["read"] == 14 and episode_events(settings) == []

    recreate_topic(settings.bootstrap_servers, settings.topic_digest, 2)
    send(settings, [reading("em1", i, 0.777) for i in range(14, 18)])  # the new topic: four more
    with log_records("meterflow.stream.detection") as records:
        second = run(settings, available_now=True, spark=spark)

    lines = [record.getMessage() for record in records]
    carried = [line for line in lines if line.startswith("detector=state-carried-over")]
    assert len(carried) == 1 and carried[0].endswith(" buckets=1 meters=1"), lines
    assert "/detector/event/" in carried[0]
    assert not [line for line in lines if "fresh-state" in line]
    # Only the old state knows the first four repeats: a fresh one would open nothing.
    assert second["open_STUCK"] == 1
    opened = [e for e in episode_events(settings) if e.episode is not None]
    assert [(e.fault_code, e.episode.action, e.episode.start) for e in opened] == [
        ("STUCK", "open", format_timestamp_us(at(10)))
    ]


def test_a_stream_killed_while_detecting_loses_and_changes_no_episode(
    spark: SparkSession, make_settings, tmp_path, mongo_uri: str, mongo_db_name: str, db
) -> None:
    """kill -9 of `meterflow stream` (driver, JVM, workers) while it publishes episodes:
    the restart publishes every one, with the same ids; the sink stores each once."""
    settings = make_settings(
        partitions=2,
        METERFLOW_DETECTION="on",
        METERFLOW_DETECTION_TIME="event",
        METERFLOW_MAX_OFFSETS_PER_TRIGGER="600",
        MONGO_URI=mongo_uri,
        MONGO_DB=mongo_db_name,
        METERFLOW_SINK_GROUP=f"sink-{uuid.uuid4().hex[:8]}",
        METERFLOW_SINK_FLUSH_SECONDS="0.2",
    )
    meters = [f"em{n:03d}" for n in range(60)]
    stuck_from = {m: 10 + n % 6 for n, m in enumerate(meters)}  # episodes open over time

    def step(i: int) -> None:
        """Reading i of every meter: normal, then stuck for 10 readings, then a new value."""
        send(
            settings,
            [reading(m, i, 0.777 if s <= i < s + 10 else normal(i)) for m, s in stuck_from.items()],
        )

    for i in range(17):  # the first meters' runs reach eight readings at i = 17
        step(i)
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERFLOW_DATA_DIR": str(settings.data_dir),
        "METERFLOW_KAFKA_SOURCE": "python",
        "METERFLOW_TRIGGER_SECONDS": "1",
        "METERFLOW_MAX_OFFSETS_PER_TRIGGER": "600",
        "METERFLOW_DETECTION": "on",
        "METERFLOW_DETECTION_TIME": "event",
        "METERFLOW_TOPIC_READINGS": settings.topic_readings,
        "METERFLOW_TOPIC_ABNORMAL": settings.topic_abnormal,
        "METERFLOW_TOPIC_DEADLETTER": settings.topic_deadletter,
        "METERFLOW_TOPIC_STATUS": settings.topic_status,
        "METERFLOW_TOPIC_DIGEST": settings.topic_digest,
        "PYSPARK_PYTHON": sys.executable,
    }
    log = tmp_path / "stream.log"
    with log.open("w") as out:
        stream = subprocess.Popen(
            [sys.executable, "-m", "meterflow.cli", "stream"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tail = lambda: log_tail(log)  # noqa: E731

    def lake_holds(count: int) -> bool:
        return still_running(stream, log) and committed_offsets(settings.lake_path) >= count

    try:
        wait_for(
            lambda: still_running(stream, log) and detector_committed(settings.checkpoint_path),
            180,
            "the detector's first batch (both queries up)",
            details=tail,
        )
        i = 17
        while i < 26 and not episode_events(settings):  # killed once the first are out
            step(i)
            i += 1
            sent = len(meters) * i
            wait_for(
                lambda n=sent: lake_holds(n),
                120,
                f"the lake to commit reading {i - 1} of every meter",
                details=tail,
                interval=0.5,  # each look reads the ledger
            )
        wait_for(
            lambda: still_running(stream, log) and episode_events(settings),
            120,
            "the first episode events",
            details=tail,
            interval=0.5,  # each look reads the topic
        )
    finally:
        os.killpg(stream.pid, signal.SIGKILL)
        stream.wait(30)
    published_before = len(episode_events(settings))
    for rest in range(i, 26):
        step(rest)
    run(settings, available_now=True, spark=spark)  # the restart, to the end

    events = episode_events(settings)
    ids = Counter(e.event_id for e in events)
    expected = {
        f"{m}|STUCK|{at(s)}|{action}" for m, s in stuck_from.items() for action in ("open", "clear")
    }
    assert set(ids) == expected  # none lost, none with another id
    assert 0 < published_before < len(expected)  # the kill came in the middle
    for event_id in ids:  # a repeat (a batch published, then killed before it committed)
        assert len({e.timestamp for e in events if e.event_id == event_id}) == 1
    consumed = len(kafka.read_to_end(settings.bootstrap_servers, settings.topic_abnormal))
    consumed += len(kafka.read_to_end(settings.bootstrap_servers, settings.topic_status))
    sink = Sink(settings, db, consumer_overrides=FAST_GROUP, instance_id=False)
    until = time.monotonic() + 90
    sink.run(lambda: sink.stats.consumed >= consumed or time.monotonic() > until)
    incidents = list(db[mongo.INCIDENTS].find({"origin": "rule"}))
    assert len(incidents) == len(meters)
    assert {i["status"] for i in incidents} == {"closed"}
    assert db[mongo.ABNORMAL_READINGS].count_documents({"episode": {"$ne": None}}) == len(meters)
