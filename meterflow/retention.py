"""Lake retention: delete date partitions older than ``METERFLOW_LAKE_RETENTION_DAYS``."""

from __future__ import annotations

from datetime import UTC, date, datetime

from meterflow import lake
from meterflow.config import Settings
from meterflow.logs import get_logger

log = get_logger(__name__)


def lake_roots(settings: Settings) -> list[str]:
    """Every partitioned dataset of the lake: the readings and each batch view."""
    roots = [lake.readings_path(settings.lake_path)]
    views = settings.views_path
    roots += [
        path for path in lake.subdirectories(views) if not path.rsplit("/", 1)[-1].startswith("_")
    ]
    return roots


def drop_expired_partitions(settings: Settings, today: str | date | None = None) -> dict:
    """Delete the expired partitions of every dataset; returns what went, per dataset."""
    day = date.fromisoformat(today) if isinstance(today, str) else today
    day = day or datetime.now(UTC).date()
    dropped = {}
    for root in lake_roots(settings):
        gone = lake.drop_partitions_before(root, settings.lake_retention_days, day)
        if gone:
            dropped[root] = [d.isoformat() for d in gone]
            log.info("retention=dropped root=%s partitions=%d", root, len(gone))
    log.info(
        "retention=done keep_days=%d datasets=%d dropped=%d",
        settings.lake_retention_days,
        len(dropped),
        sum(len(v) for v in dropped.values()),
    )
    return dropped
