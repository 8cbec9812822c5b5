"""The MongoDB sink in-process: decoding the events and status updates it consumes, and
its writer's exactly-once effects across crashes at any step.

MongoDB is mongomock, or the server ``MONGO_URI`` names. The sink through a real broker
is tested in tests/integration/test_sink_kafka.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC
from typing import Any

import pytest
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

from meterflow.clients import mongo
from meterflow.core.messages import AbnormalEvent, DeadLetterReason, StatusUpdate
from meterflow.serving.sink import (
    ServingWriter,
    UndecodableError,
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
