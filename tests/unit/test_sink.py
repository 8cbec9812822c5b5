"""The MongoDB sink in-process: decoding the events and status updates it consumes, and
its writer's exactly-once effects across crashes at any step.

MongoDB is mongomock, or the server ``MONGO_URI`` names. The sink through a real broker
is tested in tests/integration/test_sink_kafka.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, timedelta
from typing import Any

import pytest
from sink_helpers import (
    GOOD_EVENT,
    INTERVAL_S,
    START_US,
    CrashingDatabase,
    SimulatedCrashError,
    assert_events_stored,
    at_index,
    at_minute,
    episode_json,
    event_json,
    expected_events,
    status_batches,
    status_json,
    true_run,
)

from meterflow.clients import mongo
from meterflow.core.messages import AbnormalEvent, DeadLetterReason, StatusUpdate
from meterflow.serving.incidents import auto_close
from meterflow.serving.sink import (
    ServingWriter,
    UndecodableError,
    WriteResult,
    decode_abnormal,
    decode_status,
)

# -- decoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", DeadLetterReason.EMPTY),
        (b"not json", DeadLetterReason.NOT_JSON),
        (b"\xff\xfe", DeadLetterReason.NOT_JSON),
        (b"[1, 2]", DeadLetterReason.NOT_OBJECT),
        (json.dumps({**GOOD_EVENT, "event_id": None}).encode(), DeadLetterReason.MISSING_FIELD),
        (json.dumps({**GOOD_EVENT, "device_id": ""}).encode(), DeadLetterReason.MISSING_FIELD),
        (json.dumps({**GOOD_EVENT, "device_id": 12}).encode(), DeadLetterReason.WRONG_TYPE),
        (json.dumps({**GOOD_EVENT, "reading": [1]}).encode(), DeadLetterReason.WRONG_TYPE),
        (json.dumps({**GOOD_EVENT, "timestamp": "soon"}).encode(), DeadLetterReason.BAD_TIMESTAMP),
        (
            json.dumps({**GOOD_EVENT, "reading": {"$where": "1"}}).encode(),
            DeadLetterReason.WRONG_TYPE,
        ),
    ],
)
def test_undecodable_events_name_their_reason(raw: bytes, reason: DeadLetterReason) -> None:
    with pytest.raises(UndecodableError) as caught:
        decode_abnormal(raw)
    assert caught.value.reason == reason


def test_inconsistent_status_updates_are_refused() -> None:
    good = json.loads(status_json("em1", [False, True, True], 0))
    assert decode_status(json.dumps(good).encode()).trailing_faults == 2
    for broken in (
        {**good, "trailing_faults": 4},  # more than the readings
        {**good, "last_fault_code": None},  # a good last reading cannot end a run of faults
        {**good, "readings": True},
        {**good, "last_seen": 5},
    ):
        with pytest.raises(UndecodableError):
            decode_status(json.dumps(broken).encode())


# -- the writer, in-process -----------------------------------------------------------


def decoded_events(values: Iterable[bytes]) -> list[AbnormalEvent]:
    return [decode_abnormal(v) for v in values]


def decoded_statuses(values: Iterable[bytes]) -> list[StatusUpdate]:
    return [decode_status(v) for v in values]


def test_meter_status_newer_wins_older_ignored_runs_merge_recovery_clears(db: Any) -> None:
    writer = ServingWriter(db, INTERVAL_S)
    flags = [False, False, True, True, True, True, True, False, True, True]
    batches = status_batches(flags, [3, 2, 2, 1, 2])
    states = []
    for start, part in batches:
        writer.write([], decoded_statuses([status_json("em9", part, start)]))
        states.append(db[mongo.METER_STATUS].find_one({"_id": "em9"}))
        seen = flags[: start + len(part)]
        run, first = true_run(seen)
        assert states[-1]["consecutive_faults"] == run
        assert states[-1]["open_fault"] == ("SENTINEL" if seen[-1] else None)
        assert states[-1]["last_seen"].replace(tzinfo=UTC) == at_index(len(seen) - 1)
        since = states[-1]["fault_since"]
        assert (since and since.replace(tzinfo=UTC)) == (at_index(first) if run else None)
    # The run of five across three batches merged; the good reading then cleared it.
    assert max(s["consecutive_faults"] for s in states) == 5
    # An older update (a replay after a restart) changes nothing, even redelivered twice.
    before = db[mongo.METER_STATUS].find_one({"_id": "em9"})
    old_start, old_part = batches[1]
    result = writer.write([], decoded_statuses([status_json("em9", old_part, old_start)] * 2))
    assert (result.status_applied, result.status_stale) == (0, 2)
    after = db[mongo.METER_STATUS].find_one({"_id": "em9"})
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }
    # Newer and older in one batch, in any order: the newer wins.
    newer = status_json("em9", [False], len(flags))
    writer.write([], decoded_statuses([newer, status_json("em9", [True], len(flags) - 1)]))
    final = db[mongo.METER_STATUS].find_one({"_id": "em9"})
    assert final["open_fault"] is None and final["consecutive_faults"] == 0
    assert final["last_seen"].replace(tzinfo=UTC) == at_index(len(flags))


# Bulk writes of one batch: 1 events, 2 meter_status (count + state), 3 mark counted,
# 4 forget pending ids. A crash inside or between any of them must not change the result.
@pytest.mark.parametrize(
    ("crash_on", "keep"), [(1, 5), (2, 1), (2, 3), (3, 0), (3, 1), (4, 0), (4, 1)]
)
def test_writer_crash_at_any_step_then_replay_counts_every_fault_once(
    db: Any, crash_on: int, keep: int
) -> None:
    values = [event_json(f"em{i % 3}", i, i) for i in range(12)]
    values.append(values[0])  # a duplicate the streaming job published twice
    statuses = [status_json(f"em{d}", [True, True], 0) for d in range(3)]
    crashing = ServingWriter(CrashingDatabase(db, crash_on, keep), INTERVAL_S)
    with pytest.raises(SimulatedCrashError):
        crashing.write(decoded_events(values), decoded_statuses(statuses))
    healthy = ServingWriter(db, INTERVAL_S)
    healthy.write(decoded_events(values), decoded_statuses(statuses))
    again = healthy.write(decoded_events(values), decoded_statuses(statuses))
    assert again.inserted == 0 and again.counted == 0 and again.status_applied == 0
    assert_events_stored(db, expected_events(values))
    for d in range(3):
        assert db[mongo.METER_STATUS].find_one({"_id": f"em{d}"})["consecutive_faults"] == 2


# -- episodes of the stateful rules ---------------------------------------------------


def _utc(value: Any) -> Any:
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


def write_episodes(writer: ServingWriter, *values: bytes) -> WriteResult:
    """Write episode events; every one must be accounted for as the consumer counts."""
    result = writer.write(decoded_events(values), [])
    assert not result.rejected
    assert len(values) == result.inserted + result.duplicates + result.episodes_cleared
    return result


def incident(db: Any, device: str, code: str, start_minute: int) -> dict[str, Any] | None:
    start_us = START_US + start_minute * 60_000_000
    return db[mongo.INCIDENTS].find_one({"_id": f"{device}|{code}|{start_us}"})


def open_episodes(db: Any, device: str) -> dict[str, Any]:
    status = db[mongo.METER_STATUS].find_one({"_id": device}) or {}
    return {code: _utc(start) for code, start in (status.get("open_episodes") or {}).items()}


def test_episode_open_then_clear_closes_its_incident(db: Any) -> None:
    writer = ServingWriter(db, INTERVAL_S)
    opening = episode_json("em1", "STUCK", 10, "open", 115, reason="same value for 105 min")
    clearing = episode_json("em1", "STUCK", 10, "clear", 300, reason="value changed")

    opened = write_episodes(writer, opening)
    assert (opened.inserted, opened.episodes_opened, opened.episodes_cleared) == (1, 1, 0)
    stored = db[mongo.ABNORMAL_READINGS].find_one({"_id": json.loads(opening)["event_id"]})
    assert stored["fault_code"] == "STUCK" and stored["reading"] == {"value": 1.5}
    assert stored["episode"]["action"] == "open"
    assert _utc(stored["episode"]["start"]) == at_minute(10)
    doc = incident(db, "em1", "STUCK", 10)
    assert doc is not None
    assert (doc["status"], doc["origin"], doc["severity"]) == ("open", "rule", "major")
    assert (doc["device_id"], doc["meter_type"], doc["fault_code"]) == (
        "em1",
        "electricity",
        "STUCK",
    )
    assert _utc(doc["opened_at"]) == at_minute(10)
    assert _utc(doc["last_event_at"]) == at_minute(115)
    assert doc["reason"] == "same value for 105 min" and doc["closed_at"] is None
    assert open_episodes(db, "em1") == {"STUCK": at_minute(10)}

    cleared = write_episodes(writer, clearing)
    assert (cleared.inserted, cleared.episodes_opened, cleared.episodes_cleared) == (0, 0, 1)
    # A clearing is not an abnormal reading: only the opening is stored.
    assert db[mongo.ABNORMAL_READINGS].count_documents({}) == 1
    assert db[mongo.METER_STATUS].find_one({"_id": "em1"})["fault_count"] == 1
    doc = incident(db, "em1", "STUCK", 10)
    assert doc["status"] == "closed" and doc["close_reason"] == "value changed"
    assert _utc(doc["closed_at"]) == at_minute(300)
    assert _utc(doc["last_event_at"]) == at_minute(300)
    assert doc["reason"] == "same value for 105 min"
    assert open_episodes(db, "em1") == {}

    # Delivered again, both in one batch: nothing changes, both are duplicates.
    before = incident(db, "em1", "STUCK", 10)
    again = write_episodes(writer, opening, clearing)
    assert (again.inserted, again.duplicates, again.episodes_opened) == (0, 2, 0)
    assert again.episodes_cleared == 0
    assert incident(db, "em1", "STUCK", 10) == before
    assert open_episodes(db, "em1") == {}
    assert db[mongo.INCIDENTS].count_documents({}) == 1


@pytest.mark.parametrize(
    "batches", [[["clear"], ["open"]], [["clear", "open"]], [["open", "clear"]]]
)
def test_episode_cleared_before_or_with_its_opening_stays_closed(
    db: Any, batches: list[list[str]]
) -> None:
    writer = ServingWriter(db, INTERVAL_S)
    event = {
        "open": episode_json("wm2", "LEAK", 0, "open", 600, reason="night flow 9 L/h"),
        "clear": episode_json("wm2", "LEAK", 0, "clear", 2000, reason="idle again"),
    }
    for batch in batches:
        write_episodes(writer, *(event[action] for action in batch))
    doc = incident(db, "wm2", "LEAK", 0)
    assert doc["status"] == "closed" and doc["severity"] == "critical"
    assert _utc(doc["opened_at"]) == at_minute(0) and _utc(doc["closed_at"]) == at_minute(2000)
    assert (doc["reason"], doc["close_reason"]) == ("night flow 9 L/h", "idle again")
    assert _utc(doc["last_event_at"]) == at_minute(2000)
    assert open_episodes(db, "wm2") == {}
    assert db[mongo.ABNORMAL_READINGS].count_documents({}) == 1
    # And a replayed opening afterwards does not reopen it.
    write_episodes(writer, event["open"])
    assert incident(db, "wm2", "LEAK", 0)["status"] == "closed"
    assert open_episodes(db, "wm2") == {}


def test_redelivered_opening_is_stored_once(db: Any) -> None:
    writer = ServingWriter(db, INTERVAL_S)
    opening = episode_json("gm3", "NO_DATA", 60, "open", 120, value=None)
    first = write_episodes(writer, opening, opening)
    assert (first.inserted, first.duplicates, first.episodes_opened) == (1, 1, 1)
    before = incident(db, "gm3", "NO_DATA", 60)
    again = write_episodes(writer, opening)
    assert (again.inserted, again.duplicates, again.episodes_opened) == (0, 1, 0)
    assert db[mongo.ABNORMAL_READINGS].count_documents({}) == 1
    assert db[mongo.INCIDENTS].count_documents({}) == 1
    assert incident(db, "gm3", "NO_DATA", 60) == before
    status = db[mongo.METER_STATUS].find_one({"_id": "gm3"})
    assert status["fault_count"] == 1 and not status.get("pending_fault_ids")
    assert open_episodes(db, "gm3") == {"NO_DATA": at_minute(60)}


def test_an_old_clearing_does_not_clear_a_newer_episode(db: Any) -> None:
    writer = ServingWriter(db, INTERVAL_S)
    first_open = episode_json("em5", "SPIKE", 0, "open", 0)
    first_clear = episode_json("em5", "SPIKE", 0, "clear", 15)
    second_open = episode_json("em5", "SPIKE", 60, "open", 60)
    write_episodes(writer, first_open)
    # The newer opening and the older clearing in one batch, in either order.
    write_episodes(writer, second_open, first_clear)
    assert open_episodes(db, "em5") == {"SPIKE": at_minute(60)}
    # Redelivered later: the old clearing and the old opening leave the newer one alone.
    write_episodes(writer, first_clear)
    write_episodes(writer, first_open)
    assert open_episodes(db, "em5") == {"SPIKE": at_minute(60)}
    assert incident(db, "em5", "SPIKE", 0)["status"] == "closed"
    assert incident(db, "em5", "SPIKE", 60)["status"] == "open"
    # Another code of the same meter is an episode of its own.
    write_episodes(writer, episode_json("em5", "NO_DATA", 90, "open", 150, value=None))
    assert open_episodes(db, "em5") == {"SPIKE": at_minute(60), "NO_DATA": at_minute(90)}
    write_episodes(writer, episode_json("em5", "SPIKE", 60, "clear", 200))
    assert open_episodes(db, "em5") == {"NO_DATA": at_minute(90)}
    # An older opening whose clearing never came (lost upstream) cannot move it back.
    write_episodes(writer, episode_json("em5", "NO_DATA", 30, "open", 90, value=None))
    assert open_episodes(db, "em5") == {"NO_DATA": at_minute(90)}


def test_episodes_and_status_updates_of_one_meter_in_one_batch(db: Any) -> None:
    """The episode's upsert may create the meter's status document: the status update of
    the same batch (and its fault count) must still land on it."""
    writer = ServingWriter(db, INTERVAL_S)
    result = writer.write(
        decoded_events([episode_json("em7", "STUCK", 0, "open", 105), event_json("em7", 1, 3)]),
        decoded_statuses([status_json("em7", [True, True], 0)]),
    )
    assert (result.inserted, result.status_applied, result.episodes_opened) == (2, 1, 1)
    status = db[mongo.METER_STATUS].find_one({"_id": "em7"})
    assert status["fault_count"] == 2 and status["consecutive_faults"] == 2
    assert status["open_fault"] == "SENTINEL"
    assert open_episodes(db, "em7") == {"STUCK": at_minute(0)}


BAD_EPISODE = json.loads(episode_json("em1", "STUCK", 10, "open", 115))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"event_id": "em1|STUCK|0|open"}, DeadLetterReason.WRONG_TYPE),
        ({"episode": {**BAD_EPISODE["episode"], "id": "em2|STUCK|1"}}, DeadLetterReason.WRONG_TYPE),
        ({"episode": {**BAD_EPISODE["episode"], "start": "later"}}, DeadLetterReason.BAD_TIMESTAMP),
        ({"episode": {**BAD_EPISODE["episode"], "action": "reopen"}}, DeadLetterReason.WRONG_TYPE),
        ({"episode": {**BAD_EPISODE["episode"], "id": ""}}, DeadLetterReason.WRONG_TYPE),
        ({"fault_code": "SENTINEL"}, DeadLetterReason.WRONG_TYPE),
    ],
)
def test_malformed_episode_events_are_refused(overrides: dict[str, Any], reason: str) -> None:
    assert decode_abnormal(json.dumps(BAD_EPISODE).encode()).episode is not None
    with pytest.raises(UndecodableError) as caught:
        decode_abnormal(json.dumps({**BAD_EPISODE, **overrides}).encode())
    assert caught.value.reason == reason


def test_a_clearing_after_auto_close_records_the_real_end(db: Any) -> None:
    writer = ServingWriter(db, INTERVAL_S)
    write_episodes(writer, episode_json("gm4", "NO_DATA", 0, "open", 60, value=None))
    auto_closed_at = at_minute(60 * 24 * 8)
    assert auto_close(db, timedelta(hours=168), auto_closed_at) == 1
    assert open_episodes(db, "gm4") == {"NO_DATA": at_minute(0)}  # still silent
    cleared = write_episodes(writer, episode_json("gm4", "NO_DATA", 0, "clear", 60 * 24 * 9))
    assert cleared.episodes_cleared == 1
    doc = incident(db, "gm4", "NO_DATA", 0)
    assert doc["status"] == "closed" and _utc(doc["closed_at"]) == at_minute(60 * 24 * 9)
    assert doc["close_reason"] == "NO_DATA clear"
    assert _utc(doc["auto_closed_at"]) == auto_closed_at
    assert open_episodes(db, "gm4") == {}


# Bulk writes of a batch with episodes: 1 events, 2 incidents, 3 open_episodes, 4
# meter_status counts, 5 mark counted, 6 forget pending ids.
@pytest.mark.parametrize(("crash_on", "keep"), [(1, 1), (2, 0), (2, 1), (3, 0), (3, 1), (5, 0)])
def test_writer_crash_with_episodes_then_replay_ends_the_same(
    db: Any, crash_on: int, keep: int
) -> None:
    write_episodes(ServingWriter(db, INTERVAL_S), episode_json("em1", "STUCK", 0, "open", 105))
    batch = [
        episode_json("em1", "STUCK", 0, "clear", 200),
        episode_json("em1", "LEAK", 30, "open", 300),
        episode_json("em2", "NO_DATA", 40, "open", 100, value=None),
        event_json("em2", 9, 50),
    ]
    with pytest.raises(SimulatedCrashError):
        ServingWriter(CrashingDatabase(db, crash_on, keep), INTERVAL_S).write(
            decoded_events(batch), []
        )
    healthy = ServingWriter(db, INTERVAL_S)
    healthy.write(decoded_events(batch), [])
    again = write_episodes(healthy, *batch)
    assert (again.inserted, again.episodes_opened, again.episodes_cleared) == (0, 0, 0)
    assert again.duplicates == len(batch)
    assert incident(db, "em1", "STUCK", 0)["status"] == "closed"
    assert incident(db, "em1", "LEAK", 30)["status"] == "open"
    assert incident(db, "em2", "NO_DATA", 40)["status"] == "open"
    assert open_episodes(db, "em1") == {"LEAK": at_minute(30)}
    assert open_episodes(db, "em2") == {"NO_DATA": at_minute(40)}
    assert db[mongo.ABNORMAL_READINGS].count_documents({}) == 4
    counts = {d["_id"]: d["fault_count"] for d in db[mongo.METER_STATUS].find()}
    assert counts == {"em1": 2, "em2": 2}
