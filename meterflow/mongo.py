"""MongoDB for the serving layer: one client factory, the collection names, a local stand-in.

Everything that talks to MongoDB takes its database from :func:`database`, so tests can
point the whole project at ``mongomock`` (``MONGO_URI=mongomock://``) and, when
``MONGO_URI`` names a real server, run the same tests against it. The code stays thin
over ``pymongo``: bulk upserts, indexes, simple aggregations.

:func:`mongo_for` is to MongoDB what :func:`meterflow.broker.kafka_for` is to Kafka: with
``MONGO_URI`` set it checks that the server answers; without it, native demos get a local
``nx-27017`` (a MongoDB wire-protocol server over SQLite). The stand-in is experimental
(it stores ``$set`` dates as strings, ignores partial indexes and ``collMod``): good for a
demo and a networked smoke test, never the reference for MongoDB behaviour.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meterflow.config import ConfigError, Settings
from meterflow.local_service import LOOPBACK, LocalService, port_open
from meterflow.logs import get_logger

log = get_logger(__name__)

#: Collections of the ``iot`` database (README, "Serving layer: MongoDB").
ABNORMAL_READINGS = "abnormal_readings"  # _id = event id (topic-generation-partition-offset)
METER_STATUS = "meter_status"  # _id = device_id: last seen, last reading, open fault
METERS = "meters"  # _id = device_id: the fleet registry
DAILY_METER_AVERAGES = "daily_meter_averages"  # _id = "<date>|<device_id>"
DAILY_TYPE_AVERAGES = "daily_type_averages"  # _id = "<date>|<meter_type>"
DAILY_DISTRICT_AVERAGES = "daily_district_averages"  # _id = "<date>|<district>|<type>"
DAILY_REPORTS = "daily_reports"  # _id = date: what the batch job found for the day
INCIDENTS = "incidents"  # one per meter and failure episode

MOCK_SCHEME = "mongomock://"
_SERVER_SELECTION_MS = 5000

_mock_lock = threading.Lock()
_mock_clients: dict[str, Any] = {}


class MongoUnavailableError(RuntimeError):
    """MongoDB cannot be reached (or its URI is unusable)."""


def client(uri: str) -> Any:
    """A ``pymongo.MongoClient`` for ``uri``; ``mongomock://`` gives the in-process fake.

    The fake is shared per URI within the process, so the sink, the loader and a test
    that inspects the result all see the same data.
    """
    if not uri:
        raise ConfigError("MONGO_URI is empty: start a local stand-in or point it at a server")
    if uri.startswith(MOCK_SCHEME):
        import mongomock

        with _mock_lock:
            _patch_mongomock_bulk()
            if uri not in _mock_clients:
                _mock_clients[uri] = mongomock.MongoClient(tz_aware=True)
            return _mock_clients[uri]
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI

    try:
        return pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=_SERVER_SELECTION_MS, tz_aware=True
        )
    except (ConfigurationError, InvalidURI) as exc:
        raise ConfigError(f"MONGO_URI is not usable: {exc}") from None


def database(settings: Settings) -> Any:
    """The serving-layer database (``MONGO_DB``) of the configured MongoDB."""
    return client(settings.mongo_uri)[settings.mongo_db]


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

    BulkOperationBuilder.add_update = without_sort(BulkOperationBuilder.add_update)
    BulkOperationBuilder.add_replace = without_sort(BulkOperationBuilder.add_replace)
    BulkOperationBuilder._meterflow_patched = True


def ping(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`MongoUnavailableError` (one line, no credentials) unless ``uri`` answers."""
    if uri.startswith(MOCK_SCHEME):
        return
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    try:
        with pymongo.MongoClient(uri, serverSelectionTimeoutMS=int(timeout * 1000)) as probe:
            probe.admin.command("ping")
    except (ConfigurationError, InvalidURI) as exc:
        raise ConfigError(f"MONGO_URI is not usable: {exc}") from None
    except PyMongoError as exc:
        where = redacted(uri)
        reason = str(exc).split(",")[0].split(" (configured")[0]
        raise MongoUnavailableError(
            f"MongoDB at {where} did not answer within {timeout:g} s ({reason})"
        ) from None


def redacted(uri: str) -> str:
    """The URI without its user and password, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    hosts = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{hosts.split('/')[0].split('?')[0]}"


@dataclass
class LocalMongo(LocalService):
    """An ``nx-27017`` process on 127.0.0.1 with its data in ``data_dir``; stops on exit."""

    data_dir: Path = Path("mongo")
    error: type[Exception] = field(default=MongoUnavailableError, init=False, repr=False)
    name: str = field(default="local MongoDB stand-in", init=False, repr=False)

    @property
    def uri(self) -> str:
        return f"mongodb://{LOOPBACK}:{self.port}/"

    def command(self) -> list[str]:
        beside_python = Path(sys.executable).with_name("nx-27017")
        binary = str(beside_python) if beside_python.exists() else shutil.which("nx-27017")
        if binary is None:
            raise MongoUnavailableError(
                "MONGO_URI is empty and nx-27017 (the local MongoDB stand-in) is not "
                "installed: pip install -r requirements.txt, or set MONGO_URI to a MongoDB"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            binary,
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--log-file", str(self.log_path),
            "--pid-file", str(self.data_dir / "nx-27017.pid"),
        ]  # fmt: skip

    def answers(self) -> bool:
        try:
            ping(self.uri, timeout=2)
            return True
        except MongoUnavailableError:
            return False


@contextlib.contextmanager
def mongo_for(
    settings: Settings, start_local: bool = True
) -> Iterator[tuple[Settings, LocalMongo | None]]:
    """Yield settings whose ``mongo_uri`` answers, and the stand-in started for it, if any.

    With ``MONGO_URI`` set the server must answer a ping, else
    :class:`MongoUnavailableError` names it (without credentials). Without it, a stand-in
    already listening on ``METERFLOW_LOCAL_MONGO_PORT`` is reused, or one is started with
    its data under ``DATA_DIR/mongo`` (it keeps data across restarts, unlike the broker).
    """
    local = None
    if settings.mongo_uri:
        ping(settings.mongo_uri)
        log.info("mongo=external uri=%s", redacted(settings.mongo_uri))
    elif port_open(settings.local_mongo_port):
        settings = settings.with_mongo(f"mongodb://127.0.0.1:{settings.local_mongo_port}/")
        ping(settings.mongo_uri)
        log.info("mongo=local-running uri=%s", settings.mongo_uri)
    elif not start_local:
        raise MongoUnavailableError(
            f"no MongoDB: MONGO_URI is empty and nothing listens on "
            f"127.0.0.1:{settings.local_mongo_port}"
        )
    else:
        local = LocalMongo(
            port=settings.local_mongo_port,
            log_path=settings.data_dir / "logs" / "mongo.log",
            data_dir=settings.data_dir / "mongo",
        ).start()
        settings = settings.with_mongo(local.uri)
        log.info("mongo=local-started uri=%s log=%s", local.uri, local.log_path)
    try:
        yield settings, local
    finally:
        if local is not None:
            local.stop()
