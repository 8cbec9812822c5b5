"""MongoDB for the serving layer: one client factory and the collection names.

Everything that talks to MongoDB takes its database from :func:`database`, so tests can
point the whole project at ``mongomock`` (``MONGO_URI=mongomock://``) and, when
``MONGO_URI`` names a real server, run the same tests against it. The code stays thin
over ``pymongo``: bulk upserts, indexes, simple aggregations.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, cast

from meterflow.core.config import ConfigError, Settings
from meterflow.core.logs import get_logger

if TYPE_CHECKING:
    from pymongo import MongoClient
    from pymongo.database import Database

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
_mock_clients: dict[str, MongoClient[dict[str, Any]]] = {}


class MongoUnavailableError(RuntimeError):
    """MongoDB cannot be reached (or its URI is unusable)."""


def client(uri: str) -> MongoClient[dict[str, Any]]:
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
                # Duck-typed: mongomock mirrors pymongo's API without sharing its classes.
                _mock_clients[uri] = cast(
                    "MongoClient[dict[str, Any]]", mongomock.MongoClient(tz_aware=True)
                )
            return _mock_clients[uri]
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI

    try:
        return pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=_SERVER_SELECTION_MS, tz_aware=True
        )
    except (ConfigurationError, InvalidURI) as exc:
        raise ConfigError(f"MONGO_URI is not usable: {exc}") from None


def database(settings: Settings) -> Database[dict[str, Any]]:
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

    builder: Any = BulkOperationBuilder  # patched in place, which its types do not allow
    builder.add_update = without_sort(builder.add_update)
    builder.add_replace = without_sort(builder.add_replace)
    builder._meterflow_patched = True


def ping(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`MongoUnavailableError` (one line, no credentials) unless ``uri`` answers."""
    if uri.startswith(MOCK_SCHEME):
        return
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    try:
        probe: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            uri, serverSelectionTimeoutMS=int(timeout * 1000)
        )
        with probe:
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
