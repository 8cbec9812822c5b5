"""The lake's ledger: which Kafka offsets the lake holds, and what each one became.

The ledger is the lake's commit log and the streaming job's source of truth, keyed by
offsets, never by Spark batch ids (docs/architecture.md, "Exactly once into the lake"):

* Every micro-batch writes its Parquet files under ``_staging/<token>/``. The batch is
  committed by one atomic write, ``_ledger/<seq>.json``, naming the offset ranges it
  consumed per ``(topic, generation, partition)`` with their outcome counts (valid,
  abnormal, dead-lettered) and the files it made. Only then are the files moved into
  ``readings/`` and ``deadletter/``. A crash before the entry leaves only staging, which
  :meth:`Ledger.recover` deletes; a crash after it is rolled forward by the same call.
* The generation is the Kafka topic id: a topic recreated, or a broker that came back
  empty, starts a new generation, so offsets that restart at 0 are never mistaken for
  ones already committed.
* A reader of the stream drops offsets the ledger already has (:meth:`Ledger.committed`),
  so a new or reset Spark checkpoint can re-read but never double-count, and a restarted
  job starts from the ledger's ends, so nothing is skipped.
* Offsets that are gone from the broker are recorded as a ``loss`` entry, only when the
  user decided so (``--accept-data-loss``); :func:`audit` reports them with any gap.

Entries are compacted every :data:`COMPACT_EVERY` commits into ``<seq>.compact.json`` (the
merged ranges), so the ledger stays small however long the stream runs.
"""

from __future__ import annotations

import itertools
import json
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import pyarrow.fs as pafs

from meterflow.core.lake import PARTITION_COLUMN, READINGS, filesystem_for, write_atomically
from meterflow.core.logs import get_logger

log = get_logger(__name__)

LEDGER_DIR = "_ledger"
STAGING_DIR = "_staging"
COMPACT_EVERY = 100
_COMPACT_SUFFIX = ".compact.json"

BATCH = "batch"
LOSS = "loss"
GENERATION = "generation"

PartitionKey = tuple[str, str, int]  # (topic, generation, partition)


@dataclass(frozen=True)
class Range:
    """Offsets ``[start, end)`` of one partition and what they became."""

    topic: str
    generation: str
    partition: int
    start: int
    end: int
    valid: int = 0
    abnormal: int = 0
    deadletter: int = 0
    #: Newest event time (epoch µs) of a reading here that is not stamped in the future.
    max_event_us: int | None = None

    @property
    def key(self) -> PartitionKey:
        return (self.topic, self.generation, self.partition)


@dataclass(frozen=True)
class Entry:
    """One atomic commit: a micro-batch, a recorded loss or a generation change."""

    seq: int
    kind: str
    committed_at: str
    ranges: tuple[Range, ...] = ()
    files: tuple[str, ...] = ()  # final paths, relative to the lake root
    staging: str | None = None  # where the files wait until they are moved
    run_id: str = ""
    batch_id: int | None = None
    note: str = ""
    #: Partition ends the broker had shown when the entry was made ({generation: {p: end}}).
    seen_ends: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        document = asdict(self)
        document["ranges"] = [asdict(r) for r in self.ranges]
        return json.dumps(document, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Entry:
        document = json.loads(raw)
        document["ranges"] = tuple(Range(**r) for r in document.get("ranges", ()))
        document["files"] = tuple(document.get("files", ()))
        return cls(**document)


@dataclass
class Segment:
    """Merged contiguous offsets ``[start, end)``; ``lost`` marks a recorded loss."""

    start: int
    end: int
    valid: int = 0
    abnormal: int = 0
    deadletter: int = 0
    lost: bool = False
    note: str = ""


@dataclass
class PartitionState:
    segments: list[Segment] = field(default_factory=list)
    overlaps: list[tuple[int, int]] = field(default_factory=list)  # committed twice
    max_event_us: int | None = None
    last_data_at: str | None = None  # when a batch last brought offsets here

    @property
    def end(self) -> int | None:
        return max((s.end for s in self.segments), default=None)

    def add(self, start: int, end: int, counts: Segment) -> None:
        """Merge ``[start, end)``; an overlap with what is there is kept as a double count."""
        for seg in self.segments:
            if seg.start < end and start < seg.end:
                self.overlaps.append((max(start, seg.start), min(end, seg.end)))
        last = self.segments[-1] if self.segments else None
        if last is not None and last.end == start and last.lost == counts.lost and not counts.lost:
            last.end = end
            last.valid += counts.valid
            last.abnormal += counts.abnormal
            last.deadletter += counts.deadletter
            return
        self.segments.append(counts)
        self.segments.sort(key=lambda s: (s.start, s.end))


def _now() -> str:
    return datetime.now(UTC).isoformat()


_READINGS_PREFIX = f"{READINGS}/{PARTITION_COLUMN}="


def days_of_files(files: tuple[str, ...]) -> set[str]:
    """The readings partitions (``YYYY-MM-DD``) that lake-relative ``files`` are in."""
    return {
        name[len(_READINGS_PREFIX) :].split("/", 1)[0]
        for name in files
        if name.startswith(_READINGS_PREFIX)
    }


class Ledger:
    """The ledger of one lake: load it, ask what is committed, commit, recover.

    One streaming job writes a lake at a time; readers (``meterflow reconcile``) only load.
    """

    def __init__(self, lake_path: str) -> None:
        self.lake_path = lake_path
        self.fs, self.root = filesystem_for(lake_path)
        self.dir = posixpath.join(self.root, LEDGER_DIR)
        self.partitions: dict[PartitionKey, PartitionState] = {}
        self.generations: dict[str, list[str]] = {}  # topic -> generations, oldest first
        self.seq = 0
        self.compacted_seq = 0
        self.entries: list[Entry] = []  # since the last compaction
        #: generation -> {partition: end}: the furthest the broker was seen to reach.
        self.seen_ends: dict[str, dict[str, int]] = {}
        #: Per readings partition (``YYYY-MM-DD``), the last entry that added files to it:
        #: how the daily job finds days that received readings after it ran (late data).
        self.days_touched: dict[str, int] = {}

    # -- reading -------------------------------------------------------------------------

    @classmethod
    def load(cls, lake_path: str) -> Ledger:
        ledger = cls(lake_path)
        infos = ledger.fs.get_file_info(pafs.FileSelector(ledger.dir, allow_not_found=True))
        compacts = sorted(
            (int(i.base_name.split(".")[0]), i.path)
            for i in infos
            if i.base_name.endswith(_COMPACT_SUFFIX)
        )
        if compacts:
            seq, path = compacts[-1]
            ledger._load_compact(ledger._read(path))
        entries = sorted(
            (int(i.base_name[:-5]), i.path)
            for i in infos
            if i.base_name.endswith(".json")
            and not i.base_name.endswith(_COMPACT_SUFFIX)
            and i.base_name[:-5].isdigit()
        )
        for seq, path in entries:
            if seq > ledger.compacted_seq:
                ledger._apply(Entry.from_json(ledger._read(path)))
        return ledger

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            data: bytes = stream.read()
            return data

    def _apply(self, entry: Entry) -> None:
        self.seq = max(self.seq, entry.seq)
        self.entries.append(entry)
        for day in days_of_files(entry.files):
            self.days_touched[day] = max(self.days_touched.get(day, 0), entry.seq)
        for generation, ends in entry.seen_ends.items():
            seen = self.seen_ends.setdefault(generation, {})
            for partition, end in ends.items():
                seen[partition] = max(seen.get(partition, 0), end)
        for r in entry.ranges:
            known = self.generations.setdefault(r.topic, [])
            if r.generation not in known:
                known.append(r.generation)
            if entry.kind == GENERATION:
                continue
            state = self.partitions.setdefault(r.key, PartitionState())
            lost = entry.kind == LOSS
            state.add(
                r.start,
                r.end,
                Segment(r.start, r.end, r.valid, r.abnormal, r.deadletter, lost, entry.note),
            )
            if r.max_event_us is not None:
                state.max_event_us = max(state.max_event_us or r.max_event_us, r.max_event_us)
            if not lost and r.end > r.start:
                state.last_data_at = entry.committed_at

    def committed(self, topic: str, generation: str) -> dict[int, list[tuple[int, int]]]:
        """Per partition, the offset ranges the lake already holds (or has written off)."""
        return {
            key[2]: [(s.start, s.end) for s in state.segments]
            for key, state in self.partitions.items()
            if key[:2] == (topic, generation)
        }

    def unread(self, topic: str, generation: str) -> dict[int, tuple[int, int]]:
        """Per partition, offsets the broker was seen to hold that the lake never got."""
        ends = self.ends(topic, generation)
        return {
            int(p): (ends.get(int(p), 0), seen)
            for p, seen in self.seen_ends.get(generation, {}).items()
            if seen > ends.get(int(p), 0)
        }

    def ends(self, topic: str, generation: str) -> dict[int, int]:
        """Per partition, the first offset the lake does not have yet."""
        return {
            key[2]: state.end
            for key, state in self.partitions.items()
            if key[:2] == (topic, generation) and state.end is not None
        }

    def states(self, topic: str, generation: str) -> dict[int, PartitionState]:
        return {
            key[2]: state
            for key, state in self.partitions.items()
            if key[:2] == (topic, generation)
        }

    # -- writing -------------------------------------------------------------------------

    def commit(
        self,
        kind: str,
        ranges: Iterable[Range],
        files: Iterable[str] = (),
        staging: str | None = None,
        run_id: str = "",
        batch_id: int | None = None,
        note: str = "",
        seen_ends: dict[str, dict[str, int]] | None = None,
    ) -> Entry:
        """Write one entry atomically (temporary file, then rename) and apply it."""
        entry = Entry(
            seq=self.seq + 1,
            kind=kind,
            committed_at=_now(),
            ranges=tuple(ranges),
            files=tuple(files),
            staging=staging,
            run_id=run_id,
            batch_id=batch_id,
            note=note,
            seen_ends=seen_ends or {},
        )
        self.fs.create_dir(self.dir, recursive=True)
        final = posixpath.join(self.dir, f"{entry.seq:012d}.json")
        write_atomically(self.fs, final, entry.to_json())
        self._apply(entry)
        return entry

    def publish_files(self, entry: Entry) -> int:
        """Move an entry's files from staging into the lake; return how many moved.

        Idempotent: a file already in place (a crash between moves) is skipped.
        """
        if entry.staging is None:
            return 0
        staging = posixpath.join(self.root, entry.staging)
        moved = 0
        made: set[str] = set()
        for relative in entry.files:
            source = posixpath.join(staging, relative)
            target = posixpath.join(self.root, relative)
            if self.fs.get_file_info(source).type == pafs.FileType.NotFound:
                continue
            parent = posixpath.dirname(target)
            if parent not in made:
                self.fs.create_dir(parent, recursive=True)
                made.add(parent)
            self.fs.move(source, target)
            moved += 1
        self._delete_dir(staging)
        return moved

    def recover(self) -> tuple[int, int]:
        """Finish what a crash interrupted: move committed staging, delete the rest.

        Returns (files rolled forward, staging directories deleted). Call before writing.
        """
        staging_root = posixpath.join(self.root, STAGING_DIR)
        committed = {e.staging: e for e in self.entries if e.staging}
        rolled = removed = 0
        for info in self.fs.get_file_info(pafs.FileSelector(staging_root, allow_not_found=True)):
            if info.type != pafs.FileType.Directory:
                continue
            relative = f"{STAGING_DIR}/{info.base_name}"
            if relative in committed:
                rolled += self.publish_files(committed[relative])
            else:
                self._delete_dir(info.path)
                removed += 1
        if rolled or removed:
            log.warning(
                "ledger=recovered files_rolled_forward=%d uncommitted_staging_deleted=%d",
                rolled,
                removed,
            )
        return rolled, removed

    def _delete_dir(self, path: str) -> None:
        if self.fs.get_file_info(path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(path)

    def compact_if_due(self, every: int = COMPACT_EVERY) -> bool:
        """Fold the entries into one compact file, then delete them (all files are moved)."""
        if len(self.entries) < every:
            return False
        document = {
            "seq": self.seq,
            "generations": self.generations,
            "seen_ends": self.seen_ends,
            "days_touched": self.days_touched,
            "partitions": [
                {
                    "topic": key[0],
                    "generation": key[1],
                    "partition": key[2],
                    "segments": [asdict(s) for s in state.segments],
                    "overlaps": state.overlaps,
                    "max_event_us": state.max_event_us,
                    "last_data_at": state.last_data_at,
                }
                for key, state in sorted(self.partitions.items())
            ],
        }
        final = posixpath.join(self.dir, f"{self.seq:012d}{_COMPACT_SUFFIX}")
        write_atomically(self.fs, final, json.dumps(document, separators=(",", ":")).encode())
        for info in self.fs.get_file_info(pafs.FileSelector(self.dir)):
            name = info.base_name
            number = name.split(".")[0]
            if (number.isdigit() and int(number) < self.seq) or (name == f"{self.seq:012d}.json"):
                self.fs.delete_file(info.path)
        self.compacted_seq = self.seq
        self.entries = []
        return True

    def _load_compact(self, raw: bytes) -> None:
        document = json.loads(raw)
        self.seq = self.compacted_seq = document["seq"]
        self.generations = {t: list(g) for t, g in document["generations"].items()}
        self.seen_ends = document.get("seen_ends", {})
        self.days_touched = document.get("days_touched", {})
        for p in document["partitions"]:
            self.partitions[(p["topic"], p["generation"], p["partition"])] = PartitionState(
                segments=[Segment(**s) for s in p["segments"]],
                overlaps=[tuple(o) for o in p["overlaps"]],
                max_event_us=p["max_event_us"],
                last_data_at=p["last_data_at"],
            )


# -- the audit ---------------------------------------------------------------------------


@dataclass
class PartitionAudit:
    """What the ledger proves about one partition of one generation."""

    topic: str
    generation: str
    partition: int
    first: int | None
    end: int | None
    valid: int
    abnormal: int
    deadletter: int
    lost: list[tuple[int, int, str]]  # recorded losses: start, end, note
    gaps: list[tuple[int, int]]  # offsets with no outcome and no recorded loss
    double: list[tuple[int, int]]  # offsets committed twice
    #: Offsets inside committed ranges that held no record (transaction markers, compaction).
    empty_offsets: int = 0
    broker_start: int | None = None
    broker_end: int | None = None
    unread: int = 0  # offsets the broker has past the ledger's end (still to come)

    @property
    def committed(self) -> int:
        return self.valid + self.abnormal + self.deadletter

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.double


def audit(ledger: Ledger) -> Iterator[PartitionAudit]:
    """Per partition: contiguous from the first committed offset, each offset once."""
    for key, state in sorted(ledger.partitions.items()):
        segments = sorted(state.segments, key=lambda s: s.start)
        gaps = [(a.end, b.start) for a, b in itertools.pairwise(segments) if b.start > a.end]
        done = [s for s in segments if not s.lost]
        yield PartitionAudit(
            topic=key[0],
            generation=key[1],
            partition=key[2],
            first=segments[0].start if segments else None,
            end=state.end,
            valid=sum(s.valid for s in done),
            abnormal=sum(s.abnormal for s in done),
            deadletter=sum(s.deadletter for s in done),
            lost=[(s.start, s.end, s.note) for s in segments if s.lost],
            gaps=gaps,
            double=list(state.overlaps),
            empty_offsets=sum(s.end - s.start - s.valid - s.abnormal - s.deadletter for s in done),
        )
