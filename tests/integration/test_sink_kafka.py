"""The MongoDB sink: exactly-once effects over at-least-once delivery, through a real broker.

Kafka is the session's tansu broker over TCP; MongoDB is mongomock, or the server
``MONGO_URI`` names. Consumer-group joins take seconds on tansu, so each Kafka test
starts as few sinks as it can; the crash points of the writer are covered in-process
(tests/unit/test_sink.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from helpers import send, wait_for
from mongomock_client import child_env
from pymongo.errors import AutoReconnect
from sink_helpers import (
    GOOD_EVENT,
    INTERVAL_S,
    CrashingDatabase,
    SimulatedCrashError,
    assert_events_stored,
    at_index,
    event_json,
    expected_events,
    status_batches,
    status_json,
    true_run,
)

from meterflow import cli
from meterflow.clients import kafka, mongo
from meterflow.core import messages
from meterflow.core.config import Settings
from meterflow.core.messages import DeadLetterReason
from meterflow.serving.sink import (
    Sink,
)


def sink_settings(
    make_settings: Callable[..., Settings], mongo_uri: str, db: str, **env
) -> Settings:
    values = {
        "MONGO_URI": mongo_uri,
        "MONGO_DB": db,
        "METERFLOW_SINK_GROUP": f"sink-{uuid.uuid4().hex[:8]}",
        "METERFLOW_READING_INTERVAL_SECONDS": str(INTERVAL_S),
        "METERFLOW_SINK_FLUSH_SECONDS": "0.2",
    }
    return make_settings(**{**values, **env})


#: Group joins on tansu take about half the session timeout: keep it at Kafka's minimum.
#: Tests about what reaches MongoDB also make the sink a dynamic member (``instance_id=
#: False``): tansu holds a static member's join and sync 3 s each.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def run_until(sink: Sink, consumed: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    sink.run(lambda: sink.stats.consumed >= consumed or time.monotonic() > deadline)
    assert sink.stats.consumed == consumed, sink.stats.summary()


def offsets(settings: Settings) -> tuple[dict, dict]:
    """(committed offsets of the sink's group, true partition ends) of its two topics."""
    client = kafka.consumer(settings.bootstrap_servers, **{"group.id": settings.sink_group})
    try:
        parts = kafka.topic_partitions(client, [settings.topic_abnormal, settings.topic_status])
        committed = client.committed([TopicPartition(t, p) for t, p in parts], timeout=10)
        ends = kafka.partition_ends(client, parts)
    finally:
        client.close()
    return {(tp.topic, tp.partition): max(tp.offset, 0) for tp in committed}, ends


GARBAGE_ABNORMAL = [
    (b"not json at all", DeadLetterReason.NOT_JSON),
    (b'["an", "array"]', DeadLetterReason.NOT_OBJECT),
    (json.dumps({**GOOD_EVENT, "event_id": None}).encode(), DeadLetterReason.MISSING_FIELD),
    (json.dumps({**GOOD_EVENT, "device_id": 5}).encode(), DeadLetterReason.WRONG_TYPE),
]


GARBAGE_STATUS = [
    (b"{", DeadLetterReason.NOT_JSON),
    (
        json.dumps({**json.loads(status_json("em1", [True], 0)), "last_seen": "never"}).encode(),
        DeadLetterReason.BAD_TIMESTAMP,
    ),
]


def test_sink_stores_each_event_once_tracks_status_and_dead_letters_garbage(
    make_settings: Callable[..., Settings], mongo_uri: str, mongo_db_name: str, db: Any
) -> None:
    settings = sink_settings(
        make_settings, mongo_uri, mongo_db_name, METERFLOW_SINK_BATCH_SIZE="64"
    )
    devices = [f"em{n:03d}" for n in range(12)]
    events = [event_json(devices[i % len(devices)], i, i) for i in range(240)]
    replayed = events[100:130]  # the streaming job re-published a retried micro-batch
    abnormal = [*events[:120], *(v for v, _ in GARBAGE_ABNORMAL), *events[120:], *replayed]
    send(settings, [(None, v) for v in abnormal], topic=settings.topic_abnormal)

    # Each meter: a reading sequence cut into micro-batches; some batches arrive twice.
    sequences = {
        device: [(i * 7 + n) % 5 in (0, 1, 2) for i in range(12)]
        for n, device in enumerate(devices)
    }
    statuses: list[tuple[bytes | None, bytes]] = []
    for device, flags in sequences.items():
        batches = status_batches(flags, [4, 3, 2, 3])
        for start, part in batches:
            statuses.append((device.encode(), status_json(device, part, start)))
        start, part = batches[1]
        statuses.append((device.encode(), status_json(device, part, start)))  # redelivered
    statuses[5:5] = [(None, v) for v, _ in GARBAGE_STATUS]
    send(settings, statuses, topic=settings.topic_status)

    total = len(abnormal) + len(statuses)
    sink = Sink(settings, db, consumer_overrides=FAST_GROUP, instance_id=False)
    run_until(sink, total)

    assert_events_stored(db, expected_events(events))
    for device, flags in sequences.items():
        doc = db[mongo.METER_STATUS].find_one({"_id": device})
        run, first = true_run(flags)
        assert doc["consecutive_faults"] == run, device
        assert doc["open_fault"] == ("SENTINEL" if flags[-1] else None)
        assert doc["last_seen"].replace(tzinfo=UTC) == at_index(len(flags) - 1)
        assert (doc["fault_since"] and doc["fault_since"].replace(tzinfo=UTC)) == (
            at_index(first) if run else None
        )

    garbage = dict(GARBAGE_ABNORMAL) | dict(GARBAGE_STATUS)
    letters = kafka.read_to_end(settings.bootstrap_servers, settings.topic_deadletter)
    assert sorted(m.value() for m in letters) == sorted(garbage)
    for message in letters:
        headers = {k: v.decode() for k, v in message.headers()}
        assert headers[messages.DLQ_HEADER_REASON] == garbage[message.value()]
        assert headers[messages.DLQ_HEADER_DETAIL]
        assert headers[messages.DLQ_HEADER_TOPIC] in (
            settings.topic_abnormal,
            settings.topic_status,
        )
        assert int(headers[messages.DLQ_HEADER_OFFSET]) >= 0

    stats = sink.stats
    assert stats.reconciled
    assert stats.dead_lettered == len(garbage)
    assert stats.events_written == len(events)
    stale = len(devices)  # one redelivered status batch per meter
    assert stats.duplicates == len(replayed) + stale
    assert stats.status_applied == len(statuses) - len(GARBAGE_STATUS) - stale
    committed, ends = offsets(settings)
    assert committed == ends and sum(ends.values()) == total


def test_alarms_overtake_a_backlog_of_status_updates(
    make_settings: Callable[..., Settings], mongo_uri: str, mongo_db_name: str, db: Any
) -> None:
    """Issue "Performance at city scale": with MongoDB slower than the stream's status
    updates, an alarm waited behind every update the consumer had fetched (up to 10,000
    per partition). Now the updates wait in Kafka, and an alarm is written within a few
    batches of arriving, however long the backlog."""
    settings = sink_settings(
        make_settings, mongo_uri, mongo_db_name, METERFLOW_SINK_BATCH_SIZE="50"
    )
    backlog = 6_000
    statuses = [
        (f"em{n % 500:03d}".encode(), status_json(f"em{n % 500:03d}", [False], n // 500))
        for n in range(backlog)
    ]
    send(settings, statuses, topic=settings.topic_status)
    alarms = [event_json(f"em{n:03d}", n, n) for n in range(10)]
    sink = Sink(settings, db, consumer_overrides=FAST_GROUP, instance_id=False)
    applied_when_alarmed: list[int] = []
    sent = threading.Event()

    def should_stop() -> bool:
        stats = sink.stats
        if not sent.is_set() and stats.status_applied > 0:  # the backlog is being written
            send(settings, [(None, v) for v in alarms], topic=settings.topic_abnormal)
            sent.set()
        if stats.events_written >= len(alarms) and not applied_when_alarmed:
            applied_when_alarmed.append(stats.status_applied)
        return bool(applied_when_alarmed) or stats.consumed >= backlog + len(alarms)

    sink.run(should_stop)
    assert applied_when_alarmed, sink.stats.summary()
    # Two batches held in memory, the one being written, the fetch in flight: far fewer
    # than the 6,000 updates that were ahead of the alarms in Kafka.
    assert applied_when_alarmed[0] <= 1_000, (applied_when_alarmed, sink.stats.summary())
    assert_events_stored(db, expected_events(alarms))
    # What the sink held when it stopped was written, and its offsets committed, in order.
    committed, _ = offsets(settings)
    assert sum(committed.values()) == sink.stats.consumed, sink.stats.summary()


def test_sink_killed_mid_batch_restarts_without_loss_or_double_count(
    make_settings: Callable[..., Settings], mongo_uri: str, mongo_db_name: str, db: Any
) -> None:
    settings = sink_settings(
        make_settings,
        mongo_uri,
        mongo_db_name,
        METERFLOW_SINK_BATCH_SIZE="1000",
        METERFLOW_SINK_FLUSH_SECONDS="3",  # one batch holds all 150: the crash hits its 41st
    )
    events = [event_json(f"wm{i % 7}", i, i) for i in range(150)]
    send(settings, [(None, v) for v in events], topic=settings.topic_abnormal)

    # The first batch's events write lets 40 through, then the process "dies".
    doomed = Sink(
        settings,
        CrashingDatabase(db, crash_on=1, keep=40),
        consumer_overrides=FAST_GROUP,
        instance_id=False,
    )
    with pytest.raises(SimulatedCrashError):
        doomed.run(lambda: False)
    assert db[mongo.ABNORMAL_READINGS].count_documents({}) == 40
    committed, _ = offsets(settings)
    assert sum(committed.values()) == 0  # nothing committed: all of it comes again

    restarted = Sink(settings, db, consumer_overrides=FAST_GROUP, instance_id=False)
    run_until(restarted, len(events))
    assert_events_stored(db, expected_events(events))
    assert restarted.stats.events_written == len(events) - 40
    assert restarted.stats.duplicates == 40 and restarted.stats.reconciled
    committed, ends = offsets(settings)
    assert committed == ends


#: A sink process, killed by the test: prints its instance id, then "consumed" once it has
#: written and committed its first message, and stays in the group until SIGKILL. Nothing
#: reads its MongoDB back, so it writes to a mongomock of its own (tests/ on its PYTHONPATH).
KILLED_SINK = """
import mongomock_client
from meterflow.clients import mongo

mongomock_client.install()
from meterflow.core.config import Settings
from meterflow.serving.sink import Sink

sink = Sink(Settings.from_env(), mongo.client("mongomock://killed")["killed"])
print(getattr(sink, "instance_id", None), flush=True)
while sink.stats.consumed == 0:
    sink.poll_once(0.2)
print("consumed", flush=True)
while True:
    sink.poll_once(0.2)
"""


#: tansu holds a static member's JoinGroup and SyncGroup 3 s each: about 6.5 s is its best.
#: A dynamic member waits for the dead one's session (10 s before) and rejoins: 18 s.
RESTART_BOUND_S = 9.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment under which ``Settings.from_env`` gives the sink's settings back."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERFLOW_TOPIC_ABNORMAL": settings.topic_abnormal,
        "METERFLOW_TOPIC_STATUS": settings.topic_status,
        "METERFLOW_TOPIC_DEADLETTER": settings.topic_deadletter,
        "METERFLOW_SINK_GROUP": settings.sink_group,
        "METERFLOW_SINK_FLUSH_SECONDS": f"{settings.sink_flush_seconds:g}",
        "METERFLOW_DATA_DIR": str(settings.data_dir),
    }


def read_line(process: subprocess.Popen, timeout: float, log: Path) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"no line from the sink process in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
    return process.stdout.readline().decode().strip()


def test_sink_restarted_after_kill_9_takes_its_place_back_promptly(
    make_settings: Callable[..., Settings],
    mongo_uri: str,
    mongo_db_name: str,
    db: Any,
    tmp_path: Path,
) -> None:
    """A killed sink never leaves its group; its successor (same host, same group) must not
    wait for the group to time the dead member out before it consumes."""
    settings = sink_settings(make_settings, mongo_uri, mongo_db_name)
    first, second = event_json("rs1", 0, 0), event_json("rs1", 1, 1)
    send(settings, [(None, first)], topic=settings.topic_abnormal)
    log = tmp_path / "killed-sink.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", KILLED_SINK],
            env=child_env({**os.environ, **settings_env(settings)}),
            stdout=subprocess.PIPE,
            stderr=stderr,
            bufsize=0,  # unbuffered: select() then readline() never over-reads
        )
    try:
        instance = read_line(process, 60, log)
        assert read_line(process, 90, log) == "consumed"
    finally:
        process.kill()  # SIGKILL: no close(), no LeaveGroup
        process.wait(10)
        process.stdout.close()
    send(settings, [(None, second)], topic=settings.topic_abnormal)

    started = time.monotonic()
    restarted = Sink(settings, db)

    def consumed() -> int:
        restarted.poll_once(0.2)
        return restarted.stats.consumed

    try:
        wait_for(consumed, 60, "the restarted sink's first message", interval=0)
        elapsed = time.monotonic() - started
    finally:
        restarted.close()

    assert restarted.stats.consumed == 1, restarted.stats.summary()
    assert db[mongo.ABNORMAL_READINGS].find_one({"_id": json.loads(second)["event_id"]})
    assert elapsed < RESTART_BOUND_S, f"first message after {elapsed:.1f} s"
    assert restarted.instance_id == instance  # the dead sink's place in the group


class FlakyDatabase:
    """MongoDB that is down (AutoReconnect) for its first ``failures`` calls."""

    def __init__(self, db: Any, failures: int, log: list) -> None:
        self.db, self.failures, self.log = db, failures, log

    def __getitem__(self, name: str) -> Any:
        return _FlakyCollection(self, self.db[name])


class _FlakyCollection:
    def __init__(self, owner: FlakyDatabase, collection: Any) -> None:
        self.owner, self.collection = owner, collection

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.owner.failures > 0:
            self.owner.failures -= 1
            self.owner.log.append("fail")
            raise AutoReconnect("connection refused (simulated outage)")
        return getattr(self.collection, name)(*args, **kwargs)

    def bulk_write(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("bulk_write", *args, **kwargs)

    def find(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("find", *args, **kwargs)


class _CommitSpy:
    """The sink's consumer, recording when offsets are committed."""

    def __init__(self, consumer: Any, log: list) -> None:
        self.consumer, self.log = consumer, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.consumer, name)

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append("commit")
        return self.consumer.commit(*args, **kwargs)


def test_sink_waits_out_a_mongodb_outage_and_commits_only_after_writing(
    make_settings: Callable[..., Settings], mongo_uri: str, mongo_db_name: str, db: Any
) -> None:
    settings = sink_settings(
        make_settings, mongo_uri, mongo_db_name, METERFLOW_SINK_BATCH_SIZE="50"
    )
    events = [event_json(f"gm{i % 5}", i, i) for i in range(120)]
    send(settings, [(None, v) for v in events], topic=settings.topic_abnormal)
    log: list = []
    sink = Sink(
        settings,
        FlakyDatabase(db, failures=5, log=log),
        backoff_initial=0.05,
        consumer_overrides=FAST_GROUP,
        instance_id=False,
    )
    sink.consumer = _CommitSpy(sink.consumer, log)
    attempts: list[frozenset] = []
    write = sink.writer.write

    def recording_write(batch: list, statuses: list) -> Any:
        attempts.append(frozenset(e.event_id for e in batch))
        result = write(batch, statuses)
        log.append("written")
        return result

    sink.writer.write = recording_write
    run_until(sink, len(events))

    assert sink.stats.retries == 5
    assert log[:6] == ["fail"] * 5 + ["written"]
    # Every commit directly follows a completed write; none happened during the outage.
    commits = [i for i, entry in enumerate(log) if entry == "commit"]
    assert commits and all(log[i - 1] == "written" for i in commits)
    assert len(commits) == log.count("written")
    # The same batch was retried: nothing more was consumed while MongoDB was away.
    assert len(set(attempts[:6])) == 1 and len(attempts[0]) <= 50
    assert_events_stored(db, expected_events(events))
    committed, ends = offsets(settings)
    assert committed == ends


def test_sink_command_stops_on_sigterm_after_committing(
    make_settings: Callable[..., Settings],
    mongo_uri: str,
    mongo_db_name: str,
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = sink_settings(make_settings, mongo_uri, mongo_db_name)
    events = [event_json(f"em{i % 4}", i, i) for i in range(60)]
    send(settings, [(None, v) for v in events], topic=settings.topic_abnormal)
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "METERFLOW_TOPIC_ABNORMAL": settings.topic_abnormal,
        "METERFLOW_TOPIC_STATUS": settings.topic_status,
        "METERFLOW_TOPIC_DEADLETTER": settings.topic_deadletter,
        "METERFLOW_SINK_GROUP": settings.sink_group,
        "METERFLOW_DATA_DIR": str(settings.data_dir),
        "MONGO_URI": mongo_uri,
        "MONGO_DB": mongo_db_name,
    }.items():
        monkeypatch.setenv(name, value)
    logger = logging.getLogger("meterflow")
    saved = (logger.handlers[:], logger.level, logger.propagate)

    def terminate_when_stored() -> None:
        try:
            wait_for(
                lambda: db[mongo.ABNORMAL_READINGS].count_documents({}) == len(events),
                90,
                "the events in MongoDB",
            )
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # like `docker stop` (on a time-out too)

    killer = threading.Thread(target=terminate_when_stored, daemon=True)
    killer.start()
    try:
        assert cli.main(["sink"]) == 0
    finally:
        killer.join(timeout=100)
        logger.handlers[:], logger.level, logger.propagate = saved
    out = capsys.readouterr().out
    assert f"consumed {len(events)} = written {len(events)} + duplicates 0" in out
    assert "reconciled" in out and "MISMATCH" not in out
    assert_events_stored(db, expected_events(events))
    committed, ends = offsets(settings)
    assert committed == ends
