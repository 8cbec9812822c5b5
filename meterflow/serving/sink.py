"""The MongoDB sink: abnormal events and per-meter status from Kafka into the serving layer.

``meterflow sink`` runs :class:`Sink`, a consumer group on the abnormal and the status
topics that writes MongoDB in batches and commits Kafka offsets only once MongoDB has
acknowledged a batch, so a crash at any point loses nothing: the uncommitted batch is
delivered again. Re-delivery must then change nothing, which :class:`ServingWriter`
guarantees:

- ``abnormal_readings``: ``_id`` is the event id and the document is written with
  ``$setOnInsert``, so a second copy is a no-op (counted as a duplicate).
- ``meter_status.fault_count`` grows by events *newly* stored. An event is stored with
  ``counted: false``; the sink adds it to its meter's ``fault_count`` and remembers it in
  ``pending_fault_ids`` in one atomic update, then flips ``counted`` and forgets it. Replays
  after a crash between any two steps find the event either uncounted and not pending
  (count it), pending (only flip) or counted (nothing), never counting it twice.
- ``meter_status`` state follows the status topic: an update no newer than the stored
  ``last_seen`` is ignored, and the write is conditional on the ``last_seen`` it was
  merged with, so an old writer (during a rebalance) cannot overwrite a newer state.

UndecodableError messages go to the dead-letter topic with the streaming job's headers.

A sink is a *static* group member (``group.instance.id``, see :func:`claim_instance_id`):
one restarted after a crash takes its old place back instead of waiting for the group to
time out the dead member, which never said goodbye.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pymongo import UpdateMany, UpdateOne
from pymongo.database import Database
from pymongo.errors import AutoReconnect, BulkWriteError, ConnectionFailure

from meterflow.clients import kafka, mongo
from meterflow.core.config import Settings
from meterflow.core.contract import DeadLetterReason, parse_timestamp_us
from meterflow.core.logs import get_logger
from meterflow.stream.classify import DeadLetterRecord

log = get_logger(__name__)

#: MongoDB errors that mean "not reachable right now": back off and retry the same batch.
#: (``AutoReconnect`` covers ``NetworkTimeout``, ``ServerSelectionTimeoutError`` and
#: ``NotPrimaryError``; ``ConnectionFailure`` is their base.)
RETRYABLE_MONGO_ERRORS: tuple[type[Exception], ...] = (ConnectionFailure,)
_DUPLICATE_KEY = 11000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class UndecodableError(ValueError):
    """A message the sink cannot store: why (a dead-letter reason) and a human detail."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _millis(moment: datetime) -> datetime:
    """Truncated to milliseconds, BSON's precision: a re-read value compares equal."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _datetime(value: Any, name: str) -> datetime:
    if not isinstance(value, str):
        raise UndecodableError(DeadLetterReason.WRONG_TYPE, f"{name} is not a string")
    try:
        micros = parse_timestamp_us(value)
    except ValueError:
        raise UndecodableError(
            DeadLetterReason.BAD_TIMESTAMP, f"unparseable {name} {value[:64]!r}"
        ) from None
    return _millis(_EPOCH + timedelta(microseconds=micros))


def _stored_datetime(value: Any) -> datetime | None:
    """A date read back from MongoDB (the nx-27017 stand-in may return it as a string)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _object(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        raise UndecodableError(DeadLetterReason.EMPTY, "empty message (null or zero-length)")
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # includes UnicodeDecodeError
        raise UndecodableError(DeadLetterReason.NOT_JSON, f"not UTF-8 JSON: {exc}") from None
    if type(value) is not dict:
        raise UndecodableError(
            DeadLetterReason.NOT_OBJECT, f"JSON {type(value).__name__}, not an object"
        )
    return value


def _field(
    fields: Mapping[str, Any], name: str, kinds: tuple[type, ...], required: bool = True
) -> Any:
    value = fields.get(name)
    if value is None:
        if required:
            raise UndecodableError(DeadLetterReason.MISSING_FIELD, f"missing {name}")
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise UndecodableError(
            DeadLetterReason.WRONG_TYPE, f"{name} is {type(value).__name__}, not {names}"
        )
    if isinstance(value, str) and required and not value:
        raise UndecodableError(DeadLetterReason.MISSING_FIELD, f"empty {name}")
    return value


def _check_storable(value: Any, path: str = "") -> None:
    """MongoDB refuses field names that start with ``$`` or hold a dot or NUL in updates."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key.startswith("$") or "." in key or "\0" in key:
                raise UndecodableError(
                    DeadLetterReason.WRONG_TYPE, f"field name {path + key!r} cannot be stored"
                )
            _check_storable(inner, f"{path}{key}.")
    elif isinstance(value, list):
        for inner in value:
            _check_storable(inner, path)


@dataclass(frozen=True)
class AbnormalEvent:
    """An ``iot-abnormal`` message as the ``abnormal_readings`` document it becomes."""

    event_id: str
    device_id: str
    meter_type: str | None
    document: dict[str, Any]


def decode_abnormal(raw: bytes | None) -> AbnormalEvent:
    """Decode and check one event of :func:`meterflow.core.contract.abnormal_event`."""
    fields = _object(raw)
    event_id = _field(fields, "event_id", (str,))
    device_id = _field(fields, "device_id", (str,))
    meter_type = _field(fields, "meter_type", (str,), required=False)
    fault_code = _field(fields, "fault_code", (str,))
    reason = _field(fields, "reason", (str,), required=False)
    reading = _field(fields, "reading", (dict,), required=False)
    source = _field(fields, "source", (dict,), required=False)
    timestamp = _datetime(_field(fields, "timestamp", (str,)), "timestamp")
    detected_at = _datetime(_field(fields, "detected_at", (str,)), "detected_at")
    _check_storable(reading or {}, "reading.")
    _check_storable(source or {}, "source.")
    document = {
        "_id": event_id,
        "event_id": event_id,
        "device_id": device_id,
        "meter_type": meter_type,
        "timestamp": timestamp,
        "fault_code": fault_code,
        "reason": reason,
        "reading": reading,
        "detected_at": detected_at,
        "source": source,
    }
    return AbnormalEvent(event_id, device_id, meter_type, document)


@dataclass(frozen=True)
class StatusUpdate:
    """A :func:`meterflow.core.contract.meter_status_update` message, checked."""

    device_id: str
    meter_type: str | None
    last_seen: datetime
    last_value: float | None
    last_fault_code: str | None
    readings: int
    faults: int
    trailing_faults: int


def decode_status(raw: bytes | None) -> StatusUpdate:
    fields = _object(raw)
    device_id = _field(fields, "device_id", (str,))
    meter_type = _field(fields, "meter_type", (str,), required=False)
    last_seen = _datetime(_field(fields, "last_seen", (str,)), "last_seen")
    last_value = _field(fields, "last_value", (int, float), required=False)
    last_fault = _field(fields, "last_fault_code", (str,), required=False)
    readings = _field(fields, "readings", (int,))
    faults = _field(fields, "faults", (int,))
    trailing = _field(fields, "trailing_faults", (int,))
    if isinstance(last_value, float) and not math.isfinite(last_value):
        raise UndecodableError(DeadLetterReason.WRONG_TYPE, "last_value is not finite")
    if not 0 <= trailing <= faults <= readings:
        raise UndecodableError(
            DeadLetterReason.WRONG_TYPE,
            f"counts must satisfy 0 <= trailing_faults ({trailing}) <= faults ({faults}) "
            f"<= readings ({readings})",
        )
    if (last_fault is None) != (trailing == 0):
        raise UndecodableError(
            DeadLetterReason.WRONG_TYPE,
            f"last_fault_code {last_fault!r} contradicts trailing_faults {trailing}",
        )
    return StatusUpdate(
        device_id, meter_type, last_seen, last_value, last_fault, readings, faults, trailing
    )


@dataclass
class WriteResult:
    """What one :meth:`ServingWriter.write` did."""

    inserted: int = 0  # events newly stored
    duplicates: int = 0  # events already stored (or twice in the batch)
    counted: int = 0  # events added to fault_count
    status_applied: int = 0
    status_stale: int = 0  # no newer than the stored state: ignored
    rejected: dict[int, str] = field(default_factory=dict)  # event index -> MongoDB's reason


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
    for update in sorted(updates, key=lambda u: u.last_seen):
        if state.last_seen is not None and update.last_seen <= state.last_seen:
            stale += 1
            continue
        if update.trailing_faults == 0:
            state.consecutive, state.fault_since = 0, None
        elif update.trailing_faults == update.readings and state.consecutive > 0:
            state.consecutive += update.trailing_faults
            state.fault_since = state.fault_since or update.last_seen
        else:
            start = update.last_seen - timedelta(
                seconds=interval_seconds * (update.trailing_faults - 1)
            )
            if state.last_seen is not None and start <= state.last_seen:
                start = state.last_seen + timedelta(milliseconds=1)
            state.consecutive, state.fault_since = (
                update.trailing_faults,
                min(start, update.last_seen),
            )
        state.last_seen = update.last_seen
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
        unique: dict[str, int] = {}
        for index, event in enumerate(events):
            unique.setdefault(event.event_id, index)
        result.duplicates += len(events) - len(unique)
        inserted = self._store_events(events, unique, result)
        result.inserted = len(inserted)
        result.duplicates += len(unique) - len(inserted) - len(result.rejected)

        stored_ids = [e for e, i in unique.items() if i not in result.rejected]
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
        now = _millis(self.now())
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
                {"$setOnInsert": {**events[index].document, "counted": False}},
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


@dataclass
class SinkStats:
    """Running totals; ``consumed = written + duplicates + dead_lettered`` must hold."""

    consumed: int = 0
    events_written: int = 0
    status_applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    fault_counted: int = 0
    batches: int = 0
    retries: int = 0
    commit_failures: int = 0
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.events_written + self.status_applied

    @property
    def reconciled(self) -> bool:
        return self.consumed == self.written + self.duplicates + self.dead_lettered

    def summary(self) -> str:
        rate = self.consumed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"consumed={self.consumed} written={self.written} events_written="
            f"{self.events_written} status_applied={self.status_applied} duplicates="
            f"{self.duplicates} dead_lettered={self.dead_lettered} fault_counted="
            f"{self.fault_counted} batches={self.batches} retries={self.retries} "
            f"commit_failures={self.commit_failures} seconds={self.seconds:.1f} "
            f"messages_per_s={rate:.0f} reconciled={str(self.reconciled).lower()}"
        )


@dataclass
class _Entry:
    """One consumed message, decoded (or the dead letter it becomes)."""

    topic: str
    partition: int
    offset: int
    event: AbnormalEvent | None = None
    status: StatusUpdate | None = None
    dead: DeadLetterRecord | None = None


def claim_instance_id(group: str, lock_dir: Path) -> tuple[str, IO[str]] | None:
    """A ``group.instance.id`` that a restarted sink gets back: ``GROUP-HOST-N``.

    ``N`` is the first of this host's lock files under ``lock_dir`` that no live process
    holds, so two sinks running at once never share an id (Kafka would fence one of them),
    while a killed sink's lock dies with it and its successor takes the same id. Keep the
    returned file open as long as the id is in use. None where files cannot be locked.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    host = socket.gethostname() or "localhost"
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        for slot in range(256):
            handle = (lock_dir / f"sink-{group}-{host}-{slot}.lock".replace("/", "_")).open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            # Kafka accepts ASCII letters, digits, '.', '_' and '-', up to 249 of them.
            return re.sub(r"[^A-Za-z0-9._-]", "_", f"{group}-{host}-{slot}")[-249:], handle
    except OSError as exc:
        log.warning("sink=no-instance-id lock_dir=%s error=%s", lock_dir, exc)
    return None


class Sink:
    """Consumer group -> MongoDB in batches; offsets committed after MongoDB acknowledged.

    Drive it with :meth:`run` (until ``should_stop()``), or :meth:`poll_once` and
    :meth:`flush` from a test. ``db`` is any pymongo-like database (mongomock in tests).

    ``instance_id`` is the static member id: None claims one with
    :func:`claim_instance_id` (locks under ``DATA_DIR/locks``), False makes a dynamic
    member, and ``group.instance.id`` in ``consumer_overrides`` wins over both.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database[dict[str, Any]],
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        consumer_overrides: Mapping[str, Any] | None = None,
        instance_id: str | Literal[False] | None = None,
    ) -> None:
        self.settings = settings
        self.writer = ServingWriter(db, settings.reading_interval_seconds)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = SinkStats()
        self.topics = (settings.topic_abnormal, settings.topic_status)
        overrides = dict(consumer_overrides or {})
        self._instance_lock: IO[str] | None = None
        if "group.instance.id" in overrides:
            instance_id = overrides.pop("group.instance.id")
        elif instance_id is None:
            claimed = claim_instance_id(settings.sink_group, settings.data_dir / "locks")
            instance_id, self._instance_lock = claimed or (False, None)
        self.instance_id: str | None = instance_id or None
        self.consumer = kafka.consumer(
            settings.bootstrap_servers,
            **{
                "group.id": settings.sink_group,
                **({"group.instance.id": self.instance_id} if self.instance_id else {}),
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "auto.offset.reset": "earliest",
                "queued.min.messages": 10_000,
                # A dead sink's partitions move to a live one within seconds, not 45 s
                # (heartbeats run on librdkafka's own thread, so slow writes don't count).
                # 6 s is Kafka's smallest (group.min.session.timeout.ms); tansu makes a
                # joining member wait half of it, and a static one at least 3 s to join
                # and 3 s to sync.
                "session.timeout.ms": 6_000,
                "heartbeat.interval.ms": 1_000,
                **overrides,
            },
        )
        self.producer = kafka.producer(
            settings.bootstrap_servers, **{"enable.idempotence": True, "linger.ms": 5}
        )
        self._batch: list[_Entry] = []
        self._held: list[_Entry] = []  # arrived while a batch was being retried
        self._batch_started = 0.0
        self._subscribed = False
        self._paused: list[TopicPartition] = []
        self._started = time.monotonic()
        self._reported_errors: set[str] = set()

    # -- consuming ---------------------------------------------------------------------

    def _subscribe(self) -> None:
        if not self._subscribed:
            self.consumer.subscribe(list(self.topics), on_revoke=self._revoked)
            self._subscribed = True
            self._started = time.monotonic()
            log.info(
                "sink=subscribed group=%s instance=%s topics=%s batch_size=%d flush_seconds=%g",
                self.settings.sink_group,
                self.instance_id or "-",
                ",".join(self.topics),
                self.settings.sink_batch_size,
                self.settings.sink_flush_seconds,
            )

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Forget uncommitted messages of partitions we lose: their next owner re-reads them."""
        lost = {(p.topic, p.partition) for p in partitions}
        before = len(self._batch) + len(self._held)
        self._batch = [e for e in self._batch if (e.topic, e.partition) not in lost]
        self._held = [e for e in self._held if (e.topic, e.partition) not in lost]
        self._paused = [p for p in self._paused if (p.topic, p.partition) not in lost]
        dropped = before - len(self._batch) - len(self._held)
        log.info("sink=revoked partitions=%d uncommitted_dropped=%d", len(lost), dropped)

    def _entry(self, message: Message) -> _Entry:
        topic, partition, offset = kafka.coordinates(message)
        entry = _Entry(topic, partition, offset)
        try:
            if topic == self.settings.topic_abnormal:
                entry.event = decode_abnormal(message.value())
            else:
                entry.status = decode_status(message.value())
        except UndecodableError as bad:
            entry.dead = DeadLetterRecord(
                message.key(),
                message.value(),
                str(bad.reason),
                bad.detail,
                topic,
                partition,
                offset,
            )
        return entry

    def _take(self, messages: Iterable[Message], into: list[_Entry]) -> int:
        taken = 0
        for message in messages:
            error = message.error()
            if error is not None and error.fatal():
                # e.g. fenced: another sink took this instance id. Only a restart helps.
                raise KafkaException(error)
            if error is not None:
                text = str(error)
                if text not in self._reported_errors:  # e.g. a topic not created yet
                    self._reported_errors.add(text)
                    log.warning("sink=consumer-error error=%s", text)
                continue
            into.append(self._entry(message))
            taken += 1
        return taken

    def poll_once(
        self, timeout: float = 0.2, should_stop: Callable[[], bool] = lambda: False
    ) -> int:
        """Consume what arrives within ``timeout``; write the batch once full or due."""
        self._subscribe()
        if self._held:
            self._batch.extend(self._held)
            self._held = []
        room = max(1, self.settings.sink_batch_size - len(self._batch))
        was_empty = not self._batch
        taken = self._take(self.consumer.consume(min(room, 10_000), timeout), self._batch)
        self.producer.poll(0)  # serve its librdkafka log lines now, not at the next flush
        if was_empty and self._batch:
            self._batch_started = time.monotonic()
        due = time.monotonic() - self._batch_started >= self.settings.sink_flush_seconds
        if self._batch and (len(self._batch) >= self.settings.sink_batch_size or due):
            self.flush(should_stop)
        return taken

    # -- writing -----------------------------------------------------------------------

    def flush(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Write the batch (retrying while MongoDB or Kafka is away), then commit it.

        Returns False if ``should_stop()`` became true while retrying: the batch is then
        left uncommitted, to be delivered again on the next start.
        """
        if not self._batch:
            return True
        started = time.monotonic()
        retries_before = self.stats.retries
        dead = [e.dead for e in self._batch if e.dead is not None]
        if not self._retrying(lambda: self._send_dead_letters(dead), should_stop):
            return False
        outcome: list[WriteResult] = []

        def write() -> None:
            events = [e.event for e in self._batch if e.event is not None]
            statuses = [e.status for e in self._batch if e.status is not None]
            outcome[:] = [self.writer.write(events, statuses)]

        if not self._retrying(write, should_stop):
            return False
        result = outcome[0]
        refused = self._refused(result)
        if refused and not self._retrying(lambda: self._send_dead_letters(refused), should_stop):
            return False
        self._commit()
        self._resume()
        self._account(result, len(dead) + len(refused), started, retries_before)
        self._batch = []
        return True

    def _refused(self, result: WriteResult) -> list[DeadLetterRecord]:
        """Events MongoDB refused for good become dead letters (not a crash loop)."""
        if not result.rejected:
            return []
        entries = [(e, e.event) for e in self._batch if e.event is not None]
        records = []
        for i, reason in sorted(result.rejected.items()):
            entry, event = entries[i]
            records.append(
                DeadLetterRecord(
                    None,
                    json.dumps(event.document, default=str).encode(),
                    str(DeadLetterReason.WRONG_TYPE),
                    f"MongoDB refused the event: {reason}"[:500],
                    entry.topic,
                    entry.partition,
                    entry.offset,
                )
            )
        return records

    def _retrying(self, action: Callable[[], None], should_stop: Callable[[], bool]) -> bool:
        retryable: tuple[type[Exception], ...] = (
            *RETRYABLE_MONGO_ERRORS,
            kafka.KafkaUnavailableError,
        )
        attempt = 0
        while True:
            try:
                action()
                return True
            except retryable as exc:
                attempt += 1
                self.stats.retries += 1
                delay = min(self.backoff_max, self.backoff_initial * 2 ** (attempt - 1))
                what = "kafka" if isinstance(exc, kafka.KafkaUnavailableError) else "mongo"
                log.warning(
                    "sink=retry service=%s error=%s attempt=%d retry_in_s=%.2f batch=%d",
                    what,
                    type(exc).__name__,
                    attempt,
                    delay,
                    len(self._batch),
                )
                if should_stop():
                    log.warning(
                        "sink=stopping-unwritten batch=%d (delivered again on restart)",
                        len(self._batch),
                    )
                    return False
                self._wait(delay)

    def _wait(self, seconds: float) -> None:
        """Back off without consuming further, but keep polling to stay in the group."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._subscribed:
                self._pause_assigned()  # including partitions a rebalance just gave us
                self.producer.poll(0)
                message = self.consumer.poll(min(remaining, 0.2))
                if message is not None:  # fetched before the pause: keep it, in order
                    self._take([message], self._held)
            else:
                time.sleep(remaining)

    def _pause_assigned(self) -> None:
        paused = {(p.topic, p.partition) for p in self._paused}
        fresh = [p for p in self.consumer.assignment() if (p.topic, p.partition) not in paused]
        if fresh:
            self.consumer.pause(fresh)
            self._paused.extend(fresh)

    def _resume(self) -> None:
        if self._paused:
            self.consumer.resume(self._paused)
            self._paused = []

    def _send_dead_letters(self, records: list[DeadLetterRecord]) -> None:
        if not records:
            return
        failures: list[str] = []

        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None:
                failures.append(str(error))

        for record in records:
            kafka.produce(
                self.producer,
                self.settings.topic_deadletter,
                record.value,
                record.key,
                headers=record.headers(),
                on_delivery=delivered,
            )
        undelivered = self.producer.flush(30)
        if undelivered or failures:
            raise kafka.KafkaUnavailableError(
                f"{undelivered + len(failures)} dead letters not acknowledged "
                f"({failures[0] if failures else 'timeout'})"
            )

    def _commit(self) -> None:
        ends: dict[tuple[str, int], int] = {}
        for entry in self._batch:
            key = (entry.topic, entry.partition)
            ends[key] = max(ends.get(key, 0), entry.offset + 1)
        if not ends:
            return
        try:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            # Written but not committed: delivered again later, and written idempotently.
            self.stats.commit_failures += 1
            log.warning("sink=commit-failed error=%s", exc.args[0] if exc.args else exc)

    def _account(self, result: WriteResult, dead: int, started: float, retries: int) -> None:
        stats = self.stats
        stats.consumed += len(self._batch)
        stats.events_written += result.inserted
        stats.status_applied += result.status_applied
        stats.duplicates += result.duplicates + result.status_stale
        stats.dead_lettered += dead
        stats.fault_counted += result.counted
        stats.batches += 1
        stats.seconds = time.monotonic() - self._started
        elapsed = time.monotonic() - started
        log.info(
            "sink=batch batch=%d consumed=%d upserted=%d duplicates=%d status_applied=%d "
            "status_stale=%d dead_lettered=%d retries=%d write_s=%.3f events_per_s=%.0f | %s",
            stats.batches,
            len(self._batch),
            result.inserted,
            result.duplicates,
            result.status_applied,
            result.status_stale,
            dead,
            stats.retries - retries,
            elapsed,
            len(self._batch) / elapsed if elapsed > 0 else 0.0,
            stats.summary(),
        )

    # -- lifecycle ---------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> SinkStats:
        """Consume and write until ``should_stop()``; then flush, commit and close.

        An exception (a bug, or a test's simulated crash) closes the consumer *without*
        committing the batch in hand, exactly like a killed process.
        """
        try:
            while not should_stop():
                self.poll_once(0.2, should_stop)
            if self._held:
                self._batch.extend(self._held)
                self._held = []
            self.flush(should_stop)
        finally:
            self.close()
        log.info("sink=stopped %s", self.stats.summary())
        return self.stats

    def close(self) -> None:
        self.stats.seconds = time.monotonic() - self._started
        with contextlib.suppress(RuntimeError):  # already closed
            self.consumer.close()
        self.producer.flush(10)
        if self._instance_lock is not None:  # the id is free for the next sink
            self._instance_lock.close()
            self._instance_lock = None
