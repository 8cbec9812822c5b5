"""Fixtures both trees use: a free port, MongoDB (mongomock, or the server MONGO_URI names),
meterflow's logging restored after ``cli.main``, the compose file as ``docker compose`` reads
it, and the loader's environment.

The broker, Spark and Airflow fixtures are in tests/integration/conftest.py: nothing under
tests/unit/ can start them.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import free_port as _free_port
from mongomock_client import MOCK_SCHEME, install

from meterflow.local.compose import COMPOSE_FILE, env_example, interpolate

install()  # ``mongomock://`` URIs reach the in-process fake in every test of both trees


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture
def mongo_uri() -> str:
    """MongoDB for one test: the server MONGO_URI names if set, else a fresh mongomock.

    Against a real server each test gets its own database (see ``mongo_settings``).
    """
    return os.environ.get("MONGO_URI") or f"mongomock://test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def mongo_db_name() -> str:
    return f"meterflow_test_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def db(mongo_uri: str, mongo_db_name: str):
    """A fresh serving-layer database (dropped afterwards on a real server)."""
    from meterflow.clients import mongo

    database = mongo.client(mongo_uri)[mongo_db_name]
    yield database
    if not mongo_uri.startswith(MOCK_SCHEME):
        database.client.drop_database(mongo_db_name)


@pytest.fixture
def restore_logging() -> Any:
    """``cli.main`` points meterflow's log handler at the captured stderr: undo it after."""
    logger = logging.getLogger("meterflow")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


# -- the compose file (tests/unit/test_compose.py, tests/integration/test_compose_native.py)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def resolved(raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw, env_example())


# -- the loader (tests/unit/test_loader.py, tests/integration/test_loader_spark.py) ---------


@pytest.fixture
def env(tmp_path: Path, mongo_uri: str, mongo_db_name: str) -> dict[str, str]:
    return {
        "METERFLOW_DATA_DIR": str(tmp_path / "data"),
        "MONGO_URI": mongo_uri,
        "MONGO_DB": mongo_db_name,
    }
