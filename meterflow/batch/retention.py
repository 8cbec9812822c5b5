"""Lake retention: delete date partitions older than ``METERFLOW_LAKE_RETENTION_DAYS``."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pyarrow.dataset as ds

from meterflow.core import lake
from meterflow.core.logs import get_logger
from meterflow.core.timestamps import as_date

log = get_logger(__name__)
#: A lake row's Kafka partition, as the ledger keys it.
IDENTITY = ("source_topic", "source_generation", "source_partition")


def lake_roots(lake_path: str) -> list[str]:
    """Every partitioned dataset of the lake: readings, dead letters, the validated
    intervals and each batch view."""
    roots = [
        lake.readings_path(lake_path),
        lake.deadletter_path(lake_path),
        lake.validated_path(lake_path),
    ]
    roots += [
        path
        for path in lake.subdirectories(lake.views_path(lake_path))
        if not path.rsplit("/", 1)[-1].startswith("_")
    ]
    return roots


def drop_expired_partitions(
    lake_path: str, keep_days: int, today: str | date | None = None
) -> dict[str, list[str]]:
    """Delete every dataset's partitions older than ``keep_days`` (0 keeps them all); returns
    what went, per dataset."""
    day = as_date(today) if today else datetime.now(UTC).date()
    dropped = {}
    ledgered = {lake.readings_path(lake_path), lake.deadletter_path(lake_path)}
    for root in lake_roots(lake_path):
        if root in ledgered:  # what the ledger committed and retention took, for reconcile
            _record_retired(lake_path, root, keep_days, day)
        gone = lake.drop_partitions_before(root, keep_days, day)
        if gone:
            dropped[root] = [d.isoformat() for d in gone]
            log.info("retention=dropped root=%s partitions=%d", root, len(gone))
    log.info(
        "retention=done keep_days=%d datasets=%d dropped=%d",
        keep_days,
        len(dropped),
        sum(len(v) for v in dropped.values()),
    )
    return dropped


def _record_retired(lake_path: str, root: str, keep_days: int, today: date) -> None:
    """Count the expiring partitions' rows per Kafka partition before they go."""
    dataset = root.rstrip("/").rsplit("/", 1)[-1]
    for day, uri in lake.expired_partitions(root, keep_days, today).items():
        fs, path = lake.filesystem_for(uri)
        files = ds.dataset(path, filesystem=fs, format="parquet")
        if "source_generation" not in files.schema.names:
            continue  # written before generations (meterflow 0.1): not in the ledger
        table = files.to_table(columns=list(IDENTITY))
        counts = table.group_by(list(IDENTITY)).aggregate([([], "count_all")]).to_pylist()
        lake.record_retired(
            lake_path,
            dataset,
            day,
            {"|".join(str(row[c]) for c in IDENTITY): row["count_all"] for row in counts},
        )
