"""Wait until a day's lake partition is complete before aggregating it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from meterflow.core import lake
from meterflow_airflow.hooks import MeterflowHook


def partition_complete(
    day: date,
    watermark: datetime | None,
    now: datetime,
    interval_s: int,
    grace_s: int,
    watermark_written_at: datetime | None = None,
) -> tuple[bool, str]:
    """Whether ``day`` can be aggregated, and why.

    Complete when the stream's low watermark has moved one reading interval past the
    day's end (every partition, read in order, has passed it). The grace period after the
    day's end stands in for the watermark only when no stream has written one for a whole
    grace period (none runs, or it stopped): a stream that has started, or is still
    catching up on the day, as during a backfill, is waited for.
    """
    end = datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)
    if watermark is not None and watermark >= end + timedelta(seconds=interval_s):
        return True, f"stream watermark {watermark.isoformat()} is past {end.isoformat()}"
    stream_live = watermark_written_at is not None and now - watermark_written_at < timedelta(
        seconds=grace_s
    )
    if now >= end + timedelta(seconds=grace_s) and not stream_live:
        why = "no stream watermark" if watermark_written_at is None else "the stream is stopped"
        return True, f"grace period of {grace_s}s after {end.isoformat()} has passed ({why})"
    seen = watermark.isoformat() if watermark else "none yet"
    return False, f"waiting: stream watermark {seen}, day ends {end.isoformat()}"


class LakePartitionCompleteSensor(BaseSensorOperator):
    """Succeeds once ``day``'s readings are all in the lake (see :func:`partition_complete`)."""

    template_fields: Sequence[str] = ("day",)

    def __init__(self, *, day: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.day = day

    def poke(self, context: Any) -> PokeReturnValue:
        settings = MeterflowHook().settings
        done, why = partition_complete(
            date.fromisoformat(self.day),
            lake.read_watermark(settings.lake_path),
            datetime.now(UTC),
            settings.reading_interval_seconds,
            settings.day_grace_seconds,
            lake.read_watermark_written_at(settings.lake_path),
        )
        self.log.info("day=%s complete=%s %s", self.day, str(done).lower(), why)
        return PokeReturnValue(is_done=done, xcom_value=why)
