"""The idempotent MongoDB writer of the serving layer: re-delivery changes nothing.

:class:`ServingWriter` writes a batch of decoded events and status updates:

- ``abnormal_readings``: ``_id`` is the event id and the document is written with
  ``$setOnInsert``, so a second copy is a no-op (counted as a duplicate).
- ``meter_status.fault_count`` grows by events *newly* stored. An event is stored with
  ``counted: false``; the writer adds it to its meter's ``fault_count`` and remembers it in
  ``pending_fault_ids`` in one atomic update, then flips ``counted`` and forgets it. Replays
  after a crash between any two steps find the event either uncounted and not pending
  (count it), pending (only flip) or counted (nothing), never counting it twice.
- ``meter_status`` state follows the status topic: an update no newer than the stored
  ``last_seen`` is ignored, and the write is conditional on the ``last_seen`` it was
  merged with, so an old writer (during a rebalance) cannot overwrite a newer state.
- Episodes of the stateful rules (events with ``episode``): an opening is stored like any
  abnormal event and upserts its incident (``_id`` = episode id) with ``$setOnInsert``; a
  clearing is not an abnormal reading, so it only closes the incident with ``$set`` (an
  upsert too, so a clearing seen first still closes it and a later opening cannot reopen
  it). ``meter_status.open_episodes.<CODE>`` holds the start of the meter's open episode:
  set with ``$max`` (a replayed older opening cannot move it back), never for an episode
  already cleared, and unset only by the clearing of that very start. docs/architecture.md,
  "Episodes in the serving layer".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import UpdateMany, UpdateOne
from pymongo.database import Database
from pymongo.errors import AutoReconnect, BulkWriteError, ConnectionFailure

from meterflow.clients import mongo
from meterflow.core.contract import SEVERITY
from meterflow.core.messages import AbnormalEvent, Episode, StatusUpdate
from meterflow.serving.incidents import CLOSED, OPEN, ORIGIN_RULE
from meterflow.serving.sink.decode import event_document, millis, stored_time

#: MongoDB errors that mean "not reachable right now": back off and retry the same batch.
#: (``AutoReconnect`` covers ``NetworkTimeout``, ``ServerSelectionTimeoutError`` and
#: ``NotPrimaryError``; ``ConnectionFailure`` is their base.)
RETRYABLE_MONGO_ERRORS: tuple[type[Exception], ...] = (ConnectionFailure,)
_DUPLICATE_KEY = 11000
_SEVERITY_OF = {str(code): severity for code, severity in SEVERITY.items()}


@dataclass
class WriteResult:
    """What one :meth:`ServingWriter.write` did."""

    inserted: int = 0  # events newly stored
    duplicates: int = 0  # events already stored (or twice in the batch)
    counted: int = 0  # events added to fault_count
    status_applied: int = 0
    status_stale: int = 0  # no newer than the stored state: ignored
    episodes_opened: int = 0  # openings newly applied to their incident
    episodes_cleared: int = 0  # clearings newly applied (a repeated one is a duplicate)
    rejected: dict[int, str] = field(default_factory=dict)  # event index -> MongoDB's reason


def _stored_datetime(value: Any) -> datetime | None:
    """A date read back from MongoDB (the nx-27017 stand-in may return it as a string)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class _State:
    """A meter's status fields while a batch's updates are folded into it."""

    last_seen: datetime | None = None
    consecutive: int = 0
    fault_since: datetime | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def fold_status(
    stored: Mapping[str, Any] | None, updates: Iterable[StatusUpdate], interval_seconds: float
) -> tuple[dict[str, Any] | None, int, int]:
    """Merge ``updates`` (any order) into a stored ``meter_status`` document.

    Returns the fields to set (None if nothing is newer), how many updates applied and how
    many were stale. The run of faults extends when an update's readings were all faulty
    and the stored run is open, else restarts at ``trailing_faults``. A restarted run's
    start is estimated as ``trailing_faults - 1`` intervals before ``last_seen`` (the
    update does not carry the first faulty reading's time), never before the previous one.
    """
    stored = stored or {}
    state = _State(
        last_seen=_stored_datetime(stored.get("last_seen")),
        consecutive=int(stored.get("consecutive_faults") or 0),
        fault_since=_stored_datetime(stored.get("fault_since")),
    )
    applied = stale = 0
    for last_seen, update in sorted(
        ((stored_time(u.last_seen, "last_seen"), u) for u in updates), key=lambda s: s[0]
    ):
        if state.last_seen is not None and last_seen <= state.last_seen:
            stale += 1
            continue
        if update.trailing_faults == 0:
            state.consecutive, state.fault_since = 0, None
        elif update.trailing_faults == update.readings and state.consecutive > 0:
            state.consecutive += update.trailing_faults
            state.fault_since = state.fault_since or last_seen
        else:
            start = last_seen - timedelta(seconds=interval_seconds * (update.trailing_faults - 1))
            if state.last_seen is not None and start <= state.last_seen:
                start = state.last_seen + timedelta(milliseconds=1)
            state.consecutive, state.fault_since = (
                update.trailing_faults,
                min(start, last_seen),
            )
        state.last_seen = last_seen
        state.fields = {
            "device_id": update.device_id,
            "meter_type": update.meter_type or stored.get("meter_type"),
            "last_value": update.last_value,
            "open_fault": update.last_fault_code,
        }
        applied += 1
    if not applied:
        return None, applied, stale
    return (
        {
            **state.fields,
            "last_seen": state.last_seen,
            "fault_since": state.fault_since,
            "consecutive_faults": state.consecutive,
        },
        applied,
        stale,
    )


def _incident_identity(event: AbnormalEvent, episode: Episode) -> dict[str, Any]:
    """What an episode's opening and its clearing both know about its incident."""
    return {
        "device_id": event.device_id,
        "meter_type": event.meter_type,
        "fault_code": event.fault_code,
        "severity": _SEVERITY_OF.get(event.fault_code),
        "opened_at": stored_time(episode.start, "episode.start"),
        "origin": ORIGIN_RULE,
        "episode_id": episode.id,
    }


class ServingWriter:
    """Writes a batch of events and status updates to MongoDB, idempotently (module doc)."""

    def __init__(
        self,
        db: Database[dict[str, Any]],
        interval_seconds: float,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.interval_seconds = interval_seconds
        self.now = now

    def write(self, events: list[AbnormalEvent], statuses: list[StatusUpdate]) -> WriteResult:
        result = WriteResult()
        unique: dict[str, int] = {}  # event id -> index in ``events``, clearings left out
        clears: list[tuple[AbnormalEvent, Episode]] = []
        for index, event in enumerate(events):
            if event.episode is not None and event.episode.action == "clear":
                clears.append((event, event.episode))
            else:
                unique.setdefault(event.event_id, index)
        result.duplicates += len(events) - len(clears) - len(unique)
        inserted = self._store_events(events, unique, result)
        result.inserted = len(inserted)
        result.duplicates += len(unique) - len(inserted) - len(result.rejected)

        stored_ids = [e for e, i in unique.items() if i not in result.rejected]
        opens = [
            (events[i], episode)
            for i in unique.values()
            if i not in result.rejected and (episode := events[i].episode) is not None
        ]
        self._write_episodes(opens, clears, result)
        uncounted: dict[str, list[str]] = defaultdict(list)
        if stored_ids:
            for stored in self.db[mongo.ABNORMAL_READINGS].find(
                {"_id": {"$in": stored_ids}, "counted": False}, {"device_id": 1}
            ):
                uncounted[stored["device_id"]].append(stored["_id"])
        by_device: dict[str, list[StatusUpdate]] = defaultdict(list)
        for update in statuses:
            by_device[update.device_id].append(update)
        devices = sorted(set(uncounted) | set(by_device))
        if not devices:
            return result
        current = {
            doc["_id"]: doc for doc in self.db[mongo.METER_STATUS].find({"_id": {"$in": devices}})
        }
        type_of = {events[i].device_id: events[i].meter_type for i in unique.values()}
        now = millis(self.now())
        operations: list[UpdateOne] = []
        pending_before: dict[str, list[str]] = {}
        for device in devices:
            doc = current.get(device)
            pending = list((doc or {}).get("pending_fault_ids") or [])
            if pending:
                pending_before[device] = pending
            already = set(pending)
            fresh = [e for e in uncounted.get(device, []) if e not in already]
            if fresh:
                result.counted += len(fresh)
                operations.append(
                    UpdateOne(
                        {"_id": device},
                        {
                            "$inc": {"fault_count": len(fresh)},
                            "$push": {"pending_fault_ids": {"$each": fresh}},
                            "$set": {"updated_at": now},
                            "$setOnInsert": {"device_id": device, "meter_type": type_of[device]},
                        },
                        upsert=True,
                    )
                )
            merged, applied, stale = fold_status(
                doc, by_device.get(device, []), self.interval_seconds
            )
            result.status_applied += applied
            result.status_stale += stale
            if merged is not None:
                seen = doc.get("last_seen") if doc else None
                operations.append(
                    UpdateOne(
                        {"_id": device, "last_seen": seen},
                        {"$set": {**merged, "updated_at": now}, "$setOnInsert": {"fault_count": 0}},
                        upsert=doc is None,
                    )
                )
        self._bulk(mongo.METER_STATUS, operations, lost_races_ok=True)

        counted_now = [e for ids in uncounted.values() for e in ids]
        if counted_now:
            self._bulk(
                mongo.ABNORMAL_READINGS,
                [UpdateMany({"_id": {"$in": counted_now}}, {"$set": {"counted": True}})],
            )
        self._forget_pending(uncounted, pending_before)
        return result

    def _write_episodes(
        self,
        opens: Sequence[tuple[AbnormalEvent, Episode]],
        clears: Sequence[tuple[AbnormalEvent, Episode]],
        result: WriteResult,
    ) -> None:
        """Incidents, then ``meter_status.open_episodes``, for a batch's episode events.

        Every write is idempotent and commutes with the others, so the batch's order (and a
        replay of any part of it) does not matter: ``open_event_id`` and ``clear_event_id``
        tell an event already applied, and only count it as such.
        """
        if not opens and not clears:
            return
        ids = sorted({episode.id for _, episode in (*opens, *clears)})
        applied = {
            doc["_id"]: doc
            for doc in self.db[mongo.INCIDENTS].find(
                {"_id": {"$in": ids}}, {"open_event_id": 1, "clear_event_id": 1}
            )
        }
        now = millis(self.now())
        incidents: list[UpdateOne] = []
        for event, episode in opens:  # one per episode: ``unique`` holds each event once
            if "open_event_id" in applied.get(episode.id, {}):
                continue
            result.episodes_opened += 1
            incidents.append(
                UpdateOne(
                    {"_id": episode.id},
                    {
                        "$setOnInsert": {
                            **_incident_identity(event, episode),
                            "status": OPEN,
                            "closed_at": None,
                        },
                        # The reason is set, not set-on-insert: a clearing seen first
                        # inserted the incident without it.
                        "$set": {
                            "reason": event.reason,
                            "open_event_id": event.event_id,
                            "updated_at": now,
                        },
                        "$max": {"last_event_at": stored_time(event.timestamp)},
                    },
                    upsert=True,
                )
            )
        seen: set[str] = set()
        for event, episode in clears:
            if episode.id in seen or "clear_event_id" in applied.get(episode.id, {}):
                result.duplicates += 1
                continue
            seen.add(episode.id)
            result.episodes_cleared += 1
            at = stored_time(event.timestamp)
            incidents.append(
                UpdateOne(
                    {"_id": episode.id},
                    {
                        "$setOnInsert": _incident_identity(event, episode),
                        "$set": {
                            "status": CLOSED,
                            "closed_at": at,
                            "close_reason": event.reason,
                            "clear_event_id": event.event_id,
                            "updated_at": now,
                        },
                        "$max": {"last_event_at": at},
                    },
                    upsert=True,
                )
            )
        self._bulk(mongo.INCIDENTS, incidents)

        open_ids = sorted({episode.id for _, episode in opens})
        cleared = {
            doc["_id"]
            for doc in self.db[mongo.INCIDENTS].find(
                {"_id": {"$in": open_ids}, "clear_event_id": {"$exists": True}}, {"_id": 1}
            )
        }
        status: list[UpdateOne] = []
        for event, episode in opens:
            if episode.id not in cleared:  # a replayed opening must not outlive its clearing
                status.append(
                    UpdateOne(
                        {"_id": event.device_id},
                        {
                            "$max": {
                                f"open_episodes.{event.fault_code}": stored_time(episode.start)
                            },
                            "$setOnInsert": {
                                "device_id": event.device_id,
                                "meter_type": event.meter_type,
                                "fault_count": 0,
                            },
                        },
                        upsert=True,
                    )
                )
        for event, episode in clears:  # a newer episode of the code keeps its start
            field_name = f"open_episodes.{event.fault_code}"
            status.append(
                UpdateOne(
                    {"_id": event.device_id, field_name: stored_time(episode.start)},
                    {"$unset": {field_name: ""}},
                )
            )
        self._bulk(mongo.METER_STATUS, status)

    def _store_events(
        self, events: list[AbnormalEvent], unique: Mapping[str, int], result: WriteResult
    ) -> set[str]:
        """Insert-if-absent every event; return the ids newly inserted."""
        if not unique:
            return set()
        order = list(unique.items())
        operations = [
            UpdateOne(
                {"_id": event_id},
                {"$setOnInsert": {**event_document(events[index]), "counted": False}},
                upsert=True,
            )
            for event_id, index in order
        ]
        try:
            written = self.db[mongo.ABNORMAL_READINGS].bulk_write(operations, ordered=False)
            return {str(i) for i in (written.upserted_ids or {}).values()}
        except BulkWriteError as error:
            details = error.details
            if details.get("writeConcernErrors"):
                concern = details["writeConcernErrors"]
                raise AutoReconnect(f"write concern not satisfied: {concern}") from None
            for failure in details.get("writeErrors", []):
                if failure.get("code") != _DUPLICATE_KEY:  # a duplicate is a concurrent copy
                    result.rejected[order[failure["index"]][1]] = failure.get("errmsg", "refused")
            return {str(u["_id"]) for u in details.get("upserted", [])}

    def _forget_pending(
        self, uncounted: Mapping[str, list[str]], pending_before: Mapping[str, list[str]]
    ) -> None:
        """Drop counted ids from ``pending_fault_ids`` (also those a crash left behind)."""
        leftovers = [
            e
            for d, ids in pending_before.items()
            for e in ids
            if e not in set(uncounted.get(d, []))
        ]
        still_uncounted = set()
        if leftovers:
            still_uncounted = {
                doc["_id"]
                for doc in self.db[mongo.ABNORMAL_READINGS].find(
                    {"_id": {"$in": leftovers}, "counted": False}, {"_id": 1}
                )
            }
        operations = []
        for device in sorted(set(uncounted) | set(pending_before)):
            done = set(uncounted.get(device, [])) | {
                e for e in pending_before.get(device, []) if e not in still_uncounted
            }
            if done:
                operations.append(
                    UpdateOne(
                        {"_id": device}, {"$pull": {"pending_fault_ids": {"$in": sorted(done)}}}
                    )
                )
        self._bulk(mongo.METER_STATUS, operations)

    def _bulk(
        self,
        collection: str,
        operations: Sequence[UpdateOne | UpdateMany],
        lost_races_ok: bool = False,
    ) -> None:
        if not operations:
            return
        try:
            self.db[collection].bulk_write(operations, ordered=False)
        except BulkWriteError as error:
            failures = error.details.get("writeErrors", [])
            # A conditional status upsert that lost a race with a newer writer: theirs wins.
            if lost_races_ok and all(f.get("code") == _DUPLICATE_KEY for f in failures):
                return
            raise
