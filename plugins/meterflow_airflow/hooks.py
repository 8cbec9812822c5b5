"""The hook every meterflow task uses to reach its settings and MongoDB."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from meterflow.core.config import Settings
from meterflow.core.folders import job_file


class MeterflowHook(BaseHook):
    """meterflow's settings (environment variables, documented in ``meterflow config``).

    MongoDB comes from ``MONGO_URI`` alone, through :func:`meterflow.clients.mongo.database`,
    the factory the CLI and the tests use, so a task and ``meterflow load`` see one database
    and one set of credentials. There is deliberately no Airflow connection for MongoDB
    (docs/architecture.md, "One source of MongoDB credentials").
    """

    conn_name_attr = "meterflow_conn_id"
    hook_name = "meterflow"

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings.from_env()

    def get_conn(self) -> Any:
        """The serving-layer ``pymongo`` Database ``MONGO_DB`` (tz-aware), from ``MONGO_URI``."""
        from meterflow.clients.mongo import database

        return database(self.settings)


def job_path(module: str) -> str:
    """The file of a Spark job in ``jobs/`` for spark-submit, from a checkout or a wheel."""
    return str(job_file(module))
