"""The hook every meterflow task uses to reach its settings and MongoDB."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from airflow.sdk import BaseHook

from meterflow.core.config import Settings
from meterflow.core.folders import job_file


class MeterflowHook(BaseHook):
    """meterflow's settings (environment variables, documented in ``meterflow config``).

    MongoDB comes from ``MONGO_URI`` alone, through :func:`meterflow.clients.mongo.client`,
    the factory the CLI and the tests use, so a task and ``meterflow load`` see one database
    and one set of credentials. There is deliberately no Airflow connection for MongoDB
    (docs/architecture.md, "One source of MongoDB credentials"). A hook holds at most one
    ``MongoClient`` (its connection pool and monitor threads), made on first use; use it
    as a context manager, or call :meth:`close`, so the task releases it.
    """

    conn_name_attr = "meterflow_conn_id"
    hook_name = "meterflow"

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__()
        self.settings = settings or Settings.from_env()
        self._client: Any = None

    def get_conn(self) -> Any:
        """The serving-layer ``pymongo`` Database ``MONGO_DB`` (tz-aware), from ``MONGO_URI``;
        every call returns a database of the hook's one client."""
        if self._client is None:
            from meterflow.clients.mongo import client

            self._client = client(self.settings.mongo_uri)
        return self._client[self.settings.mongo_db]

    def close(self) -> None:
        """Close the hook's MongoDB client, if it made one (a later get_conn makes another)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> MeterflowHook:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def job_path(module: str) -> str:
    """The file of a Spark job in ``jobs/`` for spark-submit, from a checkout or a wheel."""
    return str(job_file(module))
