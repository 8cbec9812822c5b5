"""Lake layout and schemas: the one place the Parquet columns are named and typed.

``readings/date=YYYY-MM-DD/`` holds one row per valid or abnormal reading. The same
columns are declared here once for Arrow (the Python side) and derived for Spark (DDL).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from meterflow.core.errors import DiskFullError

TIMESTAMP = pa.timestamp("us", tz="UTC")

#: Columns of a classified message, in order. Dead letters appear only in the streaming
#: job's in-flight frame (for counting); the lake keeps :data:`LAKE_COLUMNS`.
CLASSIFIED_SCHEMA = pa.schema(
    [
        ("device_id", pa.string()),
        ("meter_type", pa.string()),
        ("event_time", TIMESTAMP),
        ("consumption", pa.float64()),
        ("unit", pa.string()),
        ("flow_rate", pa.float64()),
        # The meter's cumulative register, when it sends one (null otherwise).
        ("register", pa.float64()),
        ("fault_code", pa.string()),
        ("reason", pa.string()),
        ("status", pa.string()),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        # The Kafka topic id: offsets restart when a topic is recreated, this does not.
        ("source_generation", pa.string()),
        ("ingest_time", TIMESTAMP),
        ("date", pa.date32()),
    ]
)

#: What the lake stores: everything but the in-flight status (derivable from fault_code).
LAKE_COLUMNS: tuple[str, ...] = tuple(n for n in CLASSIFIED_SCHEMA.names if n != "status")
#: Readers give Spark this schema instead of letting it infer one from file footers:
#: faster, and it tolerates files that retention deleted (ignoreMissingFiles).
LAKE_SCHEMA = pa.schema([CLASSIFIED_SCHEMA.field(name) for name in LAKE_COLUMNS])
PARTITION_COLUMN = "date"

#: ``deadletter/date=D/``: every message that is not a reading, with its original bytes,
#: filed by the day it arrived. The ``iot-deadletter`` topic carries the same messages, or
#: a reference to this file for those too large for Kafka.
DEADLETTER_SCHEMA = pa.schema(
    [
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("source_generation", pa.string()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("ingest_time", TIMESTAMP),
        ("date", pa.date32()),
    ]
)

_SPARK_TYPES = {
    pa.string(): "STRING",
    TIMESTAMP: "TIMESTAMP",
    pa.float64(): "DOUBLE",
    pa.int32(): "INT",
    pa.int64(): "BIGINT",
    pa.date32(): "DATE",
    pa.binary(): "BINARY",
}


def spark_type(kind: pa.DataType) -> str:
    """Spark's name of one of the Arrow types above."""
    return _SPARK_TYPES[kind]


def spark_ddl(schema: pa.Schema) -> str:
    """The Spark DDL string of an Arrow schema made of the types above."""
    return ", ".join(f"`{f.name}` {spark_type(f.type)}" for f in schema)


READINGS = "readings"
DEADLETTER = "deadletter"


def readings_path(lake_path: str) -> str:
    return f"{lake_path.rstrip('/')}/{READINGS}"


def deadletter_path(lake_path: str) -> str:
    return f"{lake_path.rstrip('/')}/{DEADLETTER}"


def registry_path(lake_path: str) -> str:
    """Directory of the fleet registry (``meters.parquet``) the simulator writes."""
    return f"{lake_path.rstrip('/')}/registry"


REGISTRY_FILE = "meters.parquet"


def registry_parquet(registry: str) -> str:
    """The registry's Parquet file: ``registry`` itself if it names one, else the
    ``meters.parquet`` in that directory."""
    if registry.endswith(".parquet"):
        return registry
    return f"{registry.rstrip('/')}/{REGISTRY_FILE}"


def registry_file(lake_path: str) -> str:
    return registry_parquet(registry_path(lake_path))


def write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename.

    The temporary name is hidden (Spark and Hadoop readers skip dot files) and unique
    (writers racing on one path never share it).
    """
    directory, name = posixpath.split(path)
    fs.create_dir(directory, recursive=True)
    temporary = posixpath.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
    with fs.open_output_stream(temporary) as stream:
        stream.write(data)
    fs.move(temporary, path)


def validated_path(lake_path: str) -> str:
    """Root of the validated intervals: ``validated/date=YYYY-MM-DD/`` (meterflow.batch.vee)."""
    return f"{lake_path.rstrip('/')}/validated"


def views_path(lake_path: str) -> str:
    """Root of the batch views: ``views/<view>/date=YYYY-MM-DD/`` (see meterflow.batch.daily)."""
    return f"{lake_path.rstrip('/')}/views"


def watermark_path(lake_path: str) -> str:
    """JSON file where the streaming job records its low watermark after each commit.

    The daily DAG reads it to know when a day's partition is complete.
    """
    return f"{lake_path.rstrip('/')}/_state/streaming_watermark.json"


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A local path or any URI pyarrow reaches (``file://``, ``s3://``, ``hdfs://``)."""
    if "://" in path:
        found: tuple[pafs.FileSystem, str] = pafs.FileSystem.from_uri(path)
        return found
    return pafs.LocalFileSystem(), Path(path).absolute().as_posix()


def ensure_writable(path: str) -> None:
    """Create ``path`` if needed and prove a file can be written there (raises OSError)."""
    fs, local = filesystem_for(path)
    fs.create_dir(local, recursive=True)
    probe = f"{local.rstrip('/')}/.meterflow-write-probe-{os.getpid()}"
    with fs.open_output_stream(probe) as stream:
        stream.write(b"ok")
    fs.delete_file(probe)


def delete_dir(path: str) -> None:
    """Delete the directory ``path`` (a local path or URI) with its contents, if it exists."""
    fs, local = filesystem_for(path)
    if fs.get_file_info(local).type != pafs.FileType.NotFound:
        fs.delete_dir(local)


def retired_path(lake_path: str) -> str:
    """Per day and dataset that retention deleted, the offsets of each Kafka partition."""
    return f"{lake_path.rstrip('/')}/_state/retired_offsets.json"


def read_retired(lake_path: str) -> dict[str, dict[str, dict[str, int]]]:
    """``{dataset: {day: {"topic|generation|partition": rows}}}`` of deleted partitions."""
    fs, path = filesystem_for(retired_path(lake_path))
    try:
        with fs.open_input_stream(path) as stream:
            retired: dict[str, dict[str, dict[str, int]]] = json.loads(stream.read())
            return retired
    except FileNotFoundError:
        return {}


def record_retired(lake_path: str, dataset: str, day: date, counts: dict[str, int]) -> None:
    """Record one deleted partition's rows; recording it again (a retried deletion) replaces."""
    retired = read_retired(lake_path)
    retired.setdefault(dataset, {})[day.isoformat()] = counts
    fs, path = filesystem_for(retired_path(lake_path))
    write_atomically(fs, path, json.dumps(retired, sort_keys=True).encode())


def os_reason(error: OSError) -> str:
    """ "Permission denied", not pyarrow's paragraph around it."""
    if error.errno:
        return os.strerror(error.errno)
    found = re.search(r"\[errno (\d+)\]", str(error))
    return os.strerror(int(found.group(1))) if found else str(error).splitlines()[0]


@dataclass(frozen=True)
class StreamWatermark:
    """The stream's ``_state/streaming_watermark.json``: its low watermark and what it is for.

    A watermark speaks only for the readings the stream had read: those of ``generation``
    (the readings topic's Kafka id) up to ``offsets`` (per partition, the first offset the
    lake does not hold). ``seen`` is, per partition, how far the broker was seen to reach;
    ``confirmed`` is false from a (re)start until the stream's first commit, so a value
    carried over a restart does not speak for readings produced while it was stopped.
    ``written_at`` says the stream is alive (docs/architecture.md, "The low watermark").
    """

    watermark: datetime | None = None
    topic: str | None = None
    generation: str | None = None
    partitions: dict[str, str] = field(default_factory=dict)  # each partition's newest reading
    offsets: dict[int, int] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    confirmed: bool = False
    written_at: datetime | None = None

    def unread(self) -> dict[int, tuple[int, int]]:
        """Per partition, offsets the broker was seen to hold beyond what the lake holds."""
        return {
            p: (self.offsets.get(p, 0), end)
            for p, end in sorted(self.seen.items())
            if end > self.offsets.get(p, 0)
        }

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "watermark": _iso(self.watermark),
                "topic": self.topic,
                "generation": self.generation,
                "partitions": self.partitions,
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "seen": {str(p): o for p, o in sorted(self.seen.items())},
                "confirmed": self.confirmed,
                "written_at": _iso(self.written_at),
            }
        ).encode()

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> StreamWatermark:
        """Also reads the documents of older versions (no topic or generation: they
        never count for the current one)."""
        value = document.get("watermark") or document.get("max_event_time")  # before 0.2
        written = document.get("written_at")
        return cls(
            watermark=datetime.fromisoformat(value) if value else None,
            topic=document.get("topic"),
            generation=document.get("generation"),
            partitions=dict(document.get("partitions") or {}),
            offsets={int(p): int(o) for p, o in (document.get("offsets") or {}).items()},
            seen={int(p): int(o) for p, o in (document.get("seen") or {}).items()},
            confirmed=bool(document.get("confirmed", False)),
            written_at=datetime.fromisoformat(written) if written else None,
        )


def _iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat() if moment else None


def read_stream_watermark(lake_path: str) -> StreamWatermark:
    """The stream's watermark document; an empty one if the stream never wrote it."""
    fs, path = filesystem_for(watermark_path(lake_path))
    try:
        with fs.open_input_stream(path) as stream:
            return StreamWatermark.from_document(json.loads(stream.read()))
    except FileNotFoundError:
        return StreamWatermark()


def is_full(error: OSError) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full; pyarrow keeps errno."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def full_as_error(variable: str, path: str) -> Iterator[None]:
    """A full disk under ``path`` (the value of ``variable``) as one-line
    :class:`~meterflow.core.errors.DiskFullError`; other OSErrors pass."""
    try:
        yield
    except OSError as exc:
        if is_full(exc):
            raise DiskFullError.of(variable, path, os_reason(exc)) from None
        raise


def read_watermark(lake_path: str) -> datetime | None:
    """The time up to which the lake holds every reading the stream has seen, if known."""
    return read_stream_watermark(lake_path).watermark


def read_watermark_written_at(lake_path: str) -> datetime | None:
    """When the stream last wrote its watermark (a stale one means it is not running)."""
    return read_stream_watermark(lake_path).written_at


def write_watermark(lake_path: str, state: StreamWatermark) -> StreamWatermark:
    """Write the watermark document in one atomic rename, stamped with the time now."""
    stamped = replace(state, written_at=datetime.now(UTC))
    fs, path = filesystem_for(watermark_path(lake_path))
    write_atomically(fs, path, stamped.to_json())
    return stamped


def watermark_started(
    lake_path: str, topic: str | None = None, generation: str | None = None
) -> StreamWatermark:
    """Record that a stream is starting, so the daily DAG waits for it instead of
    declaring days complete by the grace period while it catches up.

    On the generation of the readings topic the document was written for (or when the
    caller does not know the generation yet) the watermark is kept, unconfirmed until the
    stream commits; on a new generation it starts again from None: a watermark of the
    old topic says nothing about the readings of the new one.
    """
    old = read_stream_watermark(lake_path)
    if generation is None or (old.topic, old.generation) == (topic, generation):
        state = replace(old, confirmed=False)
    else:
        state = StreamWatermark(topic=topic, generation=generation)
    return write_watermark(lake_path, state)


def advance_watermark(
    lake_path: str,
    topic: str,
    generation: str,
    watermark: datetime,
    partitions: dict[str, str],
    offsets: dict[int, int],
    seen: dict[int, int],
) -> StreamWatermark:
    """After a commit: the low watermark and the offsets it speaks for, confirmed.

    Within a generation the watermark never moves backwards (the offsets and per-partition
    times are always the latest); a document of another generation is replaced.
    """
    old = read_stream_watermark(lake_path)
    if (old.topic, old.generation) == (topic, generation) and old.watermark is not None:
        watermark = max(watermark, old.watermark)
    state = StreamWatermark(watermark, topic, generation, partitions, offsets, seen, confirmed=True)
    return write_watermark(lake_path, state)


_PARTITION = re.compile(rf"^{PARTITION_COLUMN}=(\d{{4}}-\d{{2}}-\d{{2}})$")


def subdirectories(root: str) -> list[str]:
    """Directories directly under ``root`` (none if it is absent)."""
    fs, path = filesystem_for(root)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    base = root.rstrip("/")  # keep the URI scheme, which the filesystem's paths drop
    return [f"{base}/{i.base_name}" for i in infos if i.type == pafs.FileType.Directory]


def dated_partitions(root: str) -> dict[date, str]:
    """The ``date=YYYY-MM-DD`` directories directly under ``root`` (none if it is absent)."""
    found = {}
    for path in subdirectories(root):
        match = _PARTITION.match(path.rsplit("/", 1)[-1])
        if match:
            found[date.fromisoformat(match.group(1))] = path
    return found


def expired_partitions(root: str, keep_days: int, today: date) -> dict[date, str]:
    """The date partitions of ``root`` older than ``keep_days`` days before ``today``."""
    if keep_days <= 0:
        return {}
    cutoff = today - timedelta(days=keep_days)
    return {day: uri for day, uri in sorted(dated_partitions(root).items()) if day < cutoff}


def drop_partitions_before(root: str, keep_days: int, today: date) -> list[date]:
    """Delete the date partitions of ``root`` older than ``keep_days`` days before ``today``.

    Readers set ``spark.sql.files.ignoreMissingFiles`` (see meterflow.spark.session), so a
    job that listed a partition just before it went does not fail.
    """
    dropped = []
    for day, uri in expired_partitions(root, keep_days, today).items():
        fs, path = filesystem_for(uri)
        fs.delete_dir(path)
        dropped.append(day)
    return dropped
