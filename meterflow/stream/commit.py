"""One micro-batch of the lake query: run its tasks, then commit their output to the ledger.

:class:`LakeCommitter` is the query's ``foreachBatch``. Its tasks
(:func:`meterflow.stream.tasks.process_partition`) stage files and return one summary row
per Kafka partition; the committer merges them (:func:`merge_summaries`), decides on
offsets deleted before they were read (:func:`find_gaps`), writes one ledger entry (the
commit), publishes the files and advances the low watermark (:func:`low_watermark`, a pure
function of the ledger's partition states; docs/architecture.md, "The low watermark").
"""

from __future__ import annotations

import json
import posixpath
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql.streaming import StreamingQuery

from meterflow.clients import kafka
from meterflow.core import lake
from meterflow.core.config import Settings
from meterflow.core.errors import DiskFullError, MeterflowError
from meterflow.core.ledger import BATCH, LOSS, STAGING_DIR, Ledger, PartitionState, Range
from meterflow.core.logs import get_logger
from meterflow.stream import dataloss
from meterflow.stream.foreach_batch import ForeachBatch
from meterflow.stream.tasks import SUMMARY_SCHEMA, EventTopics, Tally, TaskPlan, process_partition

log = get_logger(__name__)
_SUMMARY_DDL = lake.spark_ddl(SUMMARY_SCHEMA)
#: What a batch's counts are named, in the order its log line gives them.
COUNTS = ("read", "valid", "abnormal", "deadletter", "skipped", "lost", "unpublished")


class GenerationChangedError(MeterflowError):
    """The topic was recreated under the running query: start again to decide."""


def event_topics(settings: Settings) -> EventTopics:
    """Where the tasks publish events; the digest topic only with detection on."""
    return EventTopics(
        settings.kafka,
        settings.topic_abnormal,
        settings.topic_deadletter,
        settings.topic_status,
        settings.topic_digest if settings.detection_on else "",
    )


@dataclass
class BatchOutcome:
    """What a micro-batch's tasks did, merged per Kafka partition."""

    tallies: dict[int, Tally] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    unpublished: int = 0
    lake_full: str | None = None  # why a task could not write the lake, if one could not

    def ranges(self, topic: str, generation: str) -> list[Range]:
        """The ledger ranges of the offsets the tasks read, with what they became."""
        return [
            Range(
                topic,
                generation,
                p,
                t.first,
                t.last + 1,
                t.valid,
                t.abnormal,
                t.deadletter,
                t.max_event_us,
            )
            for p, t in sorted(self.tallies.items())
            if t.first >= 0
        ]

    def counts(self, gaps: Mapping[int, tuple[int, int]]) -> dict[str, int]:
        tallies = self.tallies.values()
        valid = sum(t.valid for t in tallies)
        abnormal = sum(t.abnormal for t in tallies)
        deadletter = sum(t.deadletter for t in tallies)
        return {
            "read": valid + abnormal + deadletter,
            "valid": valid,
            "abnormal": abnormal,
            "deadletter": deadletter,
            "skipped": sum(t.skipped for t in tallies),
            "lost": sum(b - a for a, b in gaps.values()),
            "unpublished": self.unpublished,
        }


def merge_summaries(rows: Iterable[Any]) -> BatchOutcome:
    """The tasks' summary rows (:data:`~meterflow.stream.tasks.SUMMARY_SCHEMA`) merged: a
    partition split over tasks becomes one tally, its first and last offsets the extremes."""
    outcome = BatchOutcome()
    for row in rows:
        if row.lake_full:
            outcome.lake_full = row.lake_full
            continue
        m = outcome.tallies.setdefault(row.partition, Tally())
        if row.first >= 0:
            m.first = row.first if m.first < 0 else min(m.first, row.first)
            m.last = max(m.last, row.last)
        m.valid += row.valid
        m.abnormal += row.abnormal
        m.deadletter += row.deadletter
        m.skipped += row.skipped
        if row.max_event_us is not None:
            m.max_event_us = max(m.max_event_us or row.max_event_us, row.max_event_us)
        outcome.files.extend(json.loads(row.files))
        outcome.unpublished += row.unpublished
    return outcome


def find_gaps(tallies: Mapping[int, Tally], ends: Mapping[int, int]) -> dict[int, tuple[int, int]]:
    """Per partition, the offsets between the ledger's end and the batch's first one: what
    Kafka deleted before the stream read it (the source skips to the first one left)."""
    return {
        p: (ends[p], t.first)
        for p, t in tallies.items()
        if t.first >= 0 and p in ends and t.first > ends[p]
    }


@dataclass(frozen=True)
class Watermark:
    """The low watermark and, per partition, the newest reading's event time."""

    low: datetime
    partitions: dict[str, str]


def low_watermark(
    states: Mapping[int, PartitionState], now: datetime, idle_seconds: float
) -> Watermark | None:
    """The oldest "newest reading" among partitions still bringing data (None: no reading).

    A partition that brought nothing for ``idle_seconds`` is caught up (each micro-batch
    reads every partition's backlog), so it no longer holds the others back; when all are
    idle the newest of them counts. The watermark never passes ``now``.
    """
    known = {p: s for p, s in states.items() if s.max_event_us is not None}
    if not known:
        return None
    newest = {p: s.max_event_us for p, s in known.items() if s.max_event_us is not None}
    active = [
        newest[p]
        for p, s in known.items()
        if s.last_data_at is not None
        and (now - datetime.fromisoformat(s.last_data_at)).total_seconds() <= idle_seconds
    ]
    low_us = min(active) if active else max(newest.values())
    return Watermark(
        min(now, _from_us(low_us)),
        {str(p): _from_us(us).isoformat() for p, us in sorted(newest.items())},
    )


def _from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


def advance_watermark(
    lake_path: str, topic: str, generation: str, watermark: Watermark, ledger: Ledger
) -> None:
    """Record ``watermark`` with the topic generation and the offsets it speaks for (what
    the ledger holds, and how far the broker was seen to reach): the daily DAG trusts it
    only for those (:func:`meterflow.core.lake.advance_watermark`; it never goes back).

    Bookkeeping must not stop the stream: a failed write is a warning, and the daily DAG
    waits longer.
    """
    seen = ledger.seen_ends.get(generation, {})
    try:
        lake.advance_watermark(
            lake_path,
            topic,
            generation,
            watermark.low,
            watermark.partitions,
            ledger.ends(topic, generation),
            {int(p): end for p, end in seen.items()},
        )
    except OSError as exc:
        log.warning("watermark=unwritten path=%s error=%s", lake_path, exc)


class LakeCommitter(ForeachBatch):
    """``foreachBatch``: run the batch's tasks, then commit their output through the ledger."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        generation: str,
        accept_data_loss: bool,
        publish: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.ledger = ledger
        self.generation = generation
        self.accept_data_loss = accept_data_loss
        self.topics = event_topics(settings) if publish else None
        self.run_id = uuid.uuid4().hex[:12]
        self.timings: list[tuple[int, float]] = []  # (offsets committed, seconds) per batch
        self.query: StreamingQuery | None = None
        self.lock = threading.Lock()

    def process(self, frame: DataFrame, batch_id: int) -> None:
        """Commit one micro-batch: its tasks' files, offsets and counts, in one ledger entry."""
        started = time.monotonic()
        topic = self.settings.topic_readings
        current = kafka.topic_ids(self.settings.kafka, [topic])[topic]
        if current != self.generation:
            raise GenerationChangedError(
                f"{topic} was recreated (id {self.generation} -> {current})"
            )
        staging = f"{STAGING_DIR}/{self.run_id}-{batch_id}-{uuid.uuid4().hex[:6]}"
        task = partial(process_partition, plan=self._task_plan(staging))
        outcome = merge_summaries(frame.mapInArrow(task, _SUMMARY_DDL).collect())
        lake_path = self.settings.lake_path
        if outcome.lake_full:
            lake.delete_dir(posixpath.join(lake_path, staging))
            raise DiskFullError.of("LAKE_PATH", lake_path, outcome.lake_full)
        gaps = find_gaps(outcome.tallies, self.ledger.ends(topic, self.generation))
        if gaps:
            self._record_loss(gaps, staging, batch_id)
        ranges = outcome.ranges(topic, self.generation)
        if ranges:
            with lake.full_as_error("LAKE_PATH", lake_path):
                entry = self.ledger.commit(
                    BATCH,
                    ranges,
                    outcome.files,
                    staging,
                    self.run_id,
                    batch_id,
                    seen_ends=self._seen_ends(),
                )
                self.ledger.publish_files(entry)
                self.ledger.compact_if_due()
            watermark = low_watermark(
                self.ledger.states(topic, self.generation),
                datetime.now(UTC),
                self.settings.idle_partition_seconds,
            )
            if watermark is not None:
                advance_watermark(lake_path, topic, self.generation, watermark, self.ledger)
        else:
            lake.delete_dir(posixpath.join(self.settings.lake_path, staging))
        self._account(batch_id, outcome.counts(gaps), time.monotonic() - started)

    def _task_plan(self, staging: str) -> TaskPlan:
        topic = self.settings.topic_readings
        return TaskPlan(
            lake_path=self.settings.lake_path,
            staging=staging,
            generation=self.generation,
            rules=self.settings.rules,
            timezone=self.settings.timezone,
            committed={
                (topic, p): tuple(ranges)
                for p, ranges in self.ledger.committed(topic, self.generation).items()
            },
            topics=self.topics,
        )

    def _record_loss(self, gaps: dict[int, tuple[int, int]], staging: str, batch_id: int) -> None:
        """Stop on offsets deleted before they were read, or record them as lost if accepted."""
        topic = self.settings.topic_readings
        if not self.accept_data_loss:
            lake.delete_dir(posixpath.join(self.settings.lake_path, staging))
            raise dataloss.deleted_before_read(topic, gaps)
        self.ledger.commit(
            LOSS,
            [Range(topic, self.generation, p, a, b) for p, (a, b) in sorted(gaps.items())],
            note="deleted from Kafka before read (accepted)",
            run_id=self.run_id,
            batch_id=batch_id,
        )
        log.warning("ledger=loss-recorded ranges=%s", dataloss.ranges_text(gaps, topic))

    def _account(self, batch_id: int, counts: dict[str, int], seconds: float) -> None:
        """Add the batch to the totals and log its line (an error if it does not add up)."""
        with self.lock:
            self.batches += 1
            self.totals.update(counts)
            self.timings.append((counts["read"] + counts["skipped"], seconds))
            totals = dict(self.totals)
        reconciled = counts["read"] == counts["valid"] + counts["abnormal"] + counts["deadletter"]
        log.log(
            20 if reconciled and not counts["unpublished"] else 40,
            "batch=%d read=%d valid=%d abnormal=%d deadletter=%d skipped=%d lost=%d "
            "unpublished=%d seconds=%.2f rows_per_s=%.0f total_read=%d total_valid=%d "
            "total_abnormal=%d total_deadletter=%d ledger_seq=%d",
            batch_id,
            *(counts[name] for name in COUNTS),
            seconds,
            counts["read"] / seconds if seconds else 0.0,
            totals["read"],
            totals["valid"],
            totals["abnormal"],
            totals["deadletter"],
            self.ledger.seq,
        )

    def _seen_ends(self) -> dict[str, dict[str, int]]:
        """The broker's ends as the source last reported them (a lower bound of the truth)."""
        try:
            progress = self.query.lastProgress if self.query is not None else None
            latest = progress.sources[0].latestOffset if progress else None
            offsets = json.loads(latest) if isinstance(latest, str) else latest
            parts = (offsets or {}).get(self.settings.topic_readings, {})
            return {self.generation: {str(p): int(o) for p, o in parts.items()}}
        except (AttributeError, IndexError, TypeError, ValueError):
            return {}
