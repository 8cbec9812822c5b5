"""Wait until a day's lake partition is complete before aggregating it."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date
from typing import Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from meterflow.batch.readiness import day_readiness
from meterflow_airflow.hooks import MeterflowHook


class LakePartitionCompleteSensor(BaseSensorOperator):
    """Succeeds once ``day``'s readings are all in the lake (the decision is
    :func:`meterflow.batch.readiness.partition_complete`)."""

    template_fields: Sequence[str] = ("day",)

    def __init__(self, *, day: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.day = day

    def poke(self, context: Any) -> PokeReturnValue:
        settings = MeterflowHook().settings
        done, why = day_readiness(
            settings.lake_path,
            settings.kafka,
            settings.topic_readings,
            date.fromisoformat(self.day),
            settings.reading_interval_seconds,
            settings.day_grace_seconds,
            settings.timezone,
        )
        self.log.info("day=%s complete=%s %s", self.day, str(done).lower(), why)
        return PokeReturnValue(is_done=done, xcom_value=why)
