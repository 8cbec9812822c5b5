"""The tests' in-process MongoDB: ``mongomock`` behind ``MONGO_URI=mongomock://NAME``.

Test-only: :func:`install` registers the scheme through
:func:`meterflow.clients.mongo.register_scheme`, so the sink, the loader, the CLI run
in-process (``cli.main``), Airflow's ``dag.test()`` and a test that inspects the result all
reach the same fake through ``MONGO_URI``; tests/conftest.py installs it for every test. The
fake lives in one process: a child gets one of its own only by importing this module and
calling :func:`install` (:func:`child_env` puts tests/ on its path). A child whose MongoDB
data a test reads back uses the ``nx-27017`` stand-in or a real server instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meterflow.clients import mongo

SCHEME = "mongomock"
MOCK_SCHEME = f"{SCHEME}://"
TESTS = Path(__file__).resolve().parent

_lock = threading.Lock()
_clients: dict[str, Any] = {}


def mock_client(uri: str) -> Any:
    """The fake for ``uri``, shared per URI within the process (like one server)."""
    import mongomock

    with _lock:
        _patch_mongomock_bulk()
        if uri not in _clients:
            # Duck-typed: mongomock mirrors pymongo's API without sharing its classes.
            _clients[uri] = mongomock.MongoClient(tz_aware=True)
        return _clients[uri]


def install() -> None:
    """Serve ``mongomock://`` URIs in this process (idempotent)."""
    mongo.register_scheme(SCHEME, mock_client)


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with tests/ first on ``PYTHONPATH``, for a child that imports this module."""
    path = env.get("PYTHONPATH", "")
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), path) if p)}


def _patch_mongomock_bulk() -> None:
    """Let mongomock 4.3 run pymongo >= 4.10 bulk operations (they pass a ``sort`` option).

    Without this, ``bulk_write`` on the fake raises ``TypeError`` for every ``UpdateOne``;
    a ``sort`` other than None is refused as not implemented rather than ignored.
    """
    from mongomock.collection import BulkOperationBuilder

    if getattr(BulkOperationBuilder, "_meterflow_patched", False):
        return

    def without_sort(method: Any) -> Any:
        def call(self: Any, *args: Any, sort: Any = None, **kwargs: Any) -> Any:
            if sort is not None:
                raise NotImplementedError("mongomock: bulk operations with sort")
            return method(self, *args, **kwargs)

        return call

    builder: Any = BulkOperationBuilder  # patched in place, which its types do not allow
    builder.add_update = without_sort(builder.add_update)
    builder.add_replace = without_sort(builder.add_replace)
    builder._meterflow_patched = True
