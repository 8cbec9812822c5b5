"""The sink's consumer: abnormal events and status updates from Kafka into MongoDB.

``meterflow sink`` runs :class:`Sink`, a consumer group on the abnormal and the status
topics that writes MongoDB in batches (through :class:`~meterflow.serving.sink.writer.
ServingWriter`) and commits Kafka offsets only once MongoDB has acknowledged a batch, so
a crash at any point loses nothing: the uncommitted batch is delivered again, and the
writer makes re-delivery change nothing. Alarms go first: the sink reads a few batches
ahead, and a batch takes the abnormal events waiting before any status update (one per
meter and micro-batch, far more of them); beyond :data:`BATCHES_AHEAD` batches of status
updates waiting, their partitions are paused, so a status backlog waits in Kafka rather
than in front of the alarms in the consumer's queue. Messages that do not decode, and events MongoDB
refuses for good, go to the dead-letter topic with the streaming job's headers.

A sink is a *static* group member (``group.instance.id``, see :func:`claim_instance_id`):
one restarted after a crash takes its old place back instead of waiting for the group to
time out the dead member, which never said goodbye.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pymongo.database import Database

from meterflow.clients import kafka
from meterflow.core.backoff import Backoff
from meterflow.core.config import Settings
from meterflow.core.logs import get_logger
from meterflow.core.messages import (
    AbnormalEvent,
    DeadLetterMessage,
    DeadLetterReason,
    StatusUpdate,
    UndecodableError,
    encode,
)
from meterflow.serving.sink.decode import decode_abnormal, decode_status
from meterflow.serving.sink.writer import RETRYABLE_MONGO_ERRORS, ServingWriter, WriteResult

log = get_logger(__name__)
#: Batches the sink reads ahead of the one it writes. Status updates waiting beyond this
#: pause their partitions until they are down to one batch.
BATCHES_AHEAD = 2


@dataclass
class SinkStats:
    """Running totals; ``consumed = written + duplicates + dead_lettered`` must hold.

    An episode's opening is an event written (or a duplicate) and may also open its
    incident (``episodes_opened``); its clearing is stored in no ``abnormal_readings``, so
    it counts as written through ``episodes_cleared`` (or as a duplicate).
    """

    consumed: int = 0
    events_written: int = 0
    status_applied: int = 0
    episodes_opened: int = 0
    episodes_cleared: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    fault_counted: int = 0
    batches: int = 0
    retries: int = 0
    commit_failures: int = 0
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.events_written + self.status_applied + self.episodes_cleared

    @property
    def reconciled(self) -> bool:
        return self.consumed == self.written + self.duplicates + self.dead_lettered

    def summary(self) -> str:
        rate = self.consumed / self.seconds if self.seconds > 0 else 0.0
        return (
            f"consumed={self.consumed} written={self.written} events_written="
            f"{self.events_written} status_applied={self.status_applied} episodes_opened="
            f"{self.episodes_opened} episodes_cleared={self.episodes_cleared} duplicates="
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
    dead: DeadLetterMessage | None = None


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
            settings.kafka,
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
            settings.kafka, **{"enable.idempotence": True, "linger.ms": 5}
        )
        self._batch: list[_Entry] = []
        self._held: list[_Entry] = []  # arrived while a batch was being retried
        # Consumed, waiting for room in a batch: alarms (and all but status updates) first.
        self._alarms: deque[_Entry] = deque()
        self._statuses: deque[_Entry] = deque()
        self._statuses_paused: list[TopicPartition] = []  # held back while those wait
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
        before = len(self._batch) + len(self._held) + len(self._alarms) + len(self._statuses)
        self._batch = [e for e in self._batch if (e.topic, e.partition) not in lost]
        self._held = [e for e in self._held if (e.topic, e.partition) not in lost]
        self._alarms = deque(e for e in self._alarms if (e.topic, e.partition) not in lost)
        self._statuses = deque(e for e in self._statuses if (e.topic, e.partition) not in lost)
        self._paused = [p for p in self._paused if (p.topic, p.partition) not in lost]
        self._statuses_paused = [
            p for p in self._statuses_paused if (p.topic, p.partition) not in lost
        ]
        dropped = before - len(self._batch) - len(self._held) - self._waiting()
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
            entry.dead = DeadLetterMessage(
                key=message.key(),
                value=message.value(),
                reason=str(bad.reason),
                detail=bad.detail,
                topic=topic,
                partition=partition,
                offset=offset,
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
        was_empty = not self._batch
        if self._held:
            self._route(self._held)
            self._held = []
        # Ahead of the batch: the status updates the consumer's queue holds move into
        # memory, where the alarms behind them can overtake them.
        ahead = (BATCHES_AHEAD + 1) * self.settings.sink_batch_size
        wanted = min(ahead - len(self._batch) - self._waiting(), 10_000)
        consumed: list[_Entry] = []
        taken = self._take(self.consumer.consume(wanted, timeout), consumed) if wanted > 0 else 0
        self._route(consumed)
        self._hold_back_statuses()
        self.producer.poll(0)  # serve its librdkafka log lines now, not at the next flush
        if was_empty and self._batch:
            self._batch_started = time.monotonic()
        due = time.monotonic() - self._batch_started >= self.settings.sink_flush_seconds
        if self._batch and (len(self._batch) >= self.settings.sink_batch_size or due):
            self.flush(should_stop)
        return taken

    def _waiting(self) -> int:
        return len(self._alarms) + len(self._statuses)

    def _route(self, entries: Iterable[_Entry]) -> None:
        """Queue ``entries`` by kind, then fill the batch: alarms first, status updates
        after them. A partition's entries keep their order, so a batch's offsets are always
        a prefix of what was consumed of it."""
        status = self.settings.topic_status
        for entry in entries:
            (self._statuses if entry.topic == status else self._alarms).append(entry)
        room = self.settings.sink_batch_size - len(self._batch)
        for waiting in (self._alarms, self._statuses):
            while room > 0 and waiting:
                self._batch.append(waiting.popleft())
                room -= 1

    def _hold_back_statuses(self) -> None:
        """Pause the status partitions while their updates wait in memory; resume them once
        one batch is left: the backlog stays in Kafka, and alarms reach the batch first."""
        batch_size = self.settings.sink_batch_size
        if len(self._statuses) >= BATCHES_AHEAD * batch_size:
            paused = {(p.topic, p.partition) for p in self._statuses_paused}
            fresh = [
                p
                for p in self.consumer.assignment()
                if p.topic == self.settings.topic_status and (p.topic, p.partition) not in paused
            ]
            if fresh:
                self.consumer.pause(fresh)
                self._statuses_paused.extend(fresh)
        elif self._statuses_paused and len(self._statuses) < batch_size:
            self.consumer.resume(self._statuses_paused)
            self._statuses_paused = []

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
        self._route(())  # what waits fills the next batch
        return True

    def _refused(self, result: WriteResult) -> list[DeadLetterMessage]:
        """Events MongoDB refused for good become dead letters (not a crash loop)."""
        if not result.rejected:
            return []
        entries = [(e, e.event) for e in self._batch if e.event is not None]
        records = []
        for i, reason in sorted(result.rejected.items()):
            entry, event = entries[i]
            records.append(
                DeadLetterMessage(
                    key=None,
                    value=encode(event),
                    reason=str(DeadLetterReason.WRONG_TYPE),
                    detail=f"MongoDB refused the event: {reason}"[:500],
                    topic=entry.topic,
                    partition=entry.partition,
                    offset=entry.offset,
                )
            )
        return records

    def _retrying(self, action: Callable[[], None], should_stop: Callable[[], bool]) -> bool:
        retryable: tuple[type[Exception], ...] = (
            *RETRYABLE_MONGO_ERRORS,
            kafka.KafkaUnavailableError,
        )
        backoff = Backoff(
            self.backoff_initial, self.backoff_max, stopped=should_stop, wait=self._wait
        )
        while True:
            try:
                action()
                return True
            except retryable as exc:
                backoff.failed()  # no limit: the sink waits for its services
                self.stats.retries += 1
                what = "kafka" if isinstance(exc, kafka.KafkaUnavailableError) else "mongo"
                log.warning(
                    "sink=retry service=%s error=%s attempt=%d retry_in_s=%.2f batch=%d",
                    what,
                    type(exc).__name__,
                    backoff.attempt,
                    backoff.delay,
                    len(self._batch),
                )
                if not backoff.wait():
                    log.warning(
                        "sink=stopping-unwritten batch=%d (delivered again on restart)",
                        len(self._batch),
                    )
                    return False

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
            self._statuses_paused = []  # resumed with the rest; paused again if still due

    def _send_dead_letters(self, records: list[DeadLetterMessage]) -> None:
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
        stats.episodes_opened += result.episodes_opened
        stats.episodes_cleared += result.episodes_cleared
        stats.duplicates += result.duplicates + result.status_stale
        stats.dead_lettered += dead
        stats.fault_counted += result.counted
        stats.batches += 1
        stats.seconds = time.monotonic() - self._started
        elapsed = time.monotonic() - started
        log.info(
            "sink=batch batch=%d consumed=%d upserted=%d duplicates=%d status_applied=%d "
            "status_stale=%d episodes_opened=%d episodes_cleared=%d dead_lettered=%d "
            "retries=%d write_s=%.3f events_per_s=%.0f | %s",
            stats.batches,
            len(self._batch),
            result.inserted,
            result.duplicates,
            result.status_applied,
            result.status_stale,
            result.episodes_opened,
            result.episodes_cleared,
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
            self._route(self._held)
            self._held = []
            while self.flush(should_stop) and self._batch:  # what still waits
                pass
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
