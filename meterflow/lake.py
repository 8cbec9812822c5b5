"""Lake layout and schemas: the one place the Parquet columns are named and typed.

``readings/date=YYYY-MM-DD/`` holds one row per valid or abnormal reading. The same
columns are declared here once for Arrow (the Python side) and derived for Spark (DDL).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

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
        ("fault_code", pa.string()),
        ("reason", pa.string()),
        ("status", pa.string()),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
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

_SPARK_TYPES = {
    pa.string(): "STRING",
    TIMESTAMP: "TIMESTAMP",
    pa.float64(): "DOUBLE",
    pa.int32(): "INT",
    pa.int64(): "BIGINT",
    pa.date32(): "DATE",
}


def spark_ddl(schema: pa.Schema) -> str:
    """The Spark DDL string of an Arrow schema made of the types above."""
    return ", ".join(f"`{f.name}` {_SPARK_TYPES[f.type]}" for f in schema)


def readings_path(lake_path: str) -> str:
    return f"{lake_path.rstrip('/')}/readings"


def registry_path(lake_path: str) -> str:
    """Directory of the fleet registry (``meters.parquet``) the simulator writes."""
    return f"{lake_path.rstrip('/')}/registry"


REGISTRY_FILE = "meters.parquet"


def registry_file(lake_path: str) -> str:
    return f"{registry_path(lake_path)}/{REGISTRY_FILE}"


def views_path(lake_path: str) -> str:
    """Root of the batch views: ``views/<view>/date=YYYY-MM-DD/`` (see jobs/daily_batch_job)."""
    return f"{lake_path.rstrip('/')}/views"


def watermark_path(lake_path: str) -> str:
    """JSON file where the streaming job records its event-time progress after each batch.

    The daily DAG reads it to know when a day's partition is complete.
    """
    return f"{lake_path.rstrip('/')}/_state/streaming_watermark.json"


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A local path or any URI pyarrow reaches (``file://``, ``s3://``, ``hdfs://``)."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), Path(path).absolute().as_posix()


def read_watermark(lake_path: str) -> datetime | None:
    """The latest event time the streaming job has committed to the lake, if any."""
    fs, path = filesystem_for(watermark_path(lake_path))
    try:
        with fs.open_input_stream(path) as stream:
            document = json.loads(stream.read())
    except FileNotFoundError:
        return None
    return datetime.fromisoformat(document["max_event_time"])


def advance_watermark(lake_path: str, event_time: datetime, batch_id: int) -> datetime:
    """Record ``event_time`` as the stream's progress unless an earlier batch went further.

    Written to a temporary file then moved, so a reader never sees half a document.
    """
    current = read_watermark(lake_path)
    if current is not None and current >= event_time:
        return current
    fs, path = filesystem_for(watermark_path(lake_path))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    document = {
        "max_event_time": event_time.astimezone(UTC).isoformat(),
        "batch_id": batch_id,
        "written_at": datetime.now(UTC).isoformat(),
    }
    with fs.open_output_stream(f"{path}.tmp") as stream:
        stream.write(json.dumps(document).encode())
    fs.move(f"{path}.tmp", path)
    return event_time


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


def drop_partitions_before(root: str, keep_days: int, today: date) -> list[date]:
    """Delete the date partitions of ``root`` older than ``keep_days`` days before ``today``.

    Readers of the streaming sink's output set ``spark.sql.files.ignoreMissingFiles`` so
    that files its metadata log still lists may disappear (see meterflow.spark.session).
    """
    if keep_days <= 0:
        return []
    cutoff = today - timedelta(days=keep_days)
    dropped = []
    for day, uri in sorted(dated_partitions(root).items()):
        if day < cutoff:
            fs, path = filesystem_for(uri)
            fs.delete_dir(path)
            dropped.append(day)
    return dropped
